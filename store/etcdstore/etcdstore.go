// Package etcdstore is the Store for N meshid replicas sharing one etcd
// cluster (issue 13), on go.etcd.io/etcd/client/v3.
//
// Key space, under Options.Prefix (p):
//
//	p w/rev               the watch marker (see Revision)
//	p w/entry/<id>        entries            (watched)
//	p w/ca/<id>           CAs and JWT keys   (watched)
//	p w/revoked/<serial>  revoked serials    (watched)
//	p w/token/<hash>      join tokens        (watched)
//	p w/agent/<id>        node agents        (watched)
//	p w/crls              the leader's signed CRL set (watched)
//	p uniq/<sha256>       entry uniqueness claim -> entry ID
//	p svid/x/<exp><serial> inventory row; <exp> is 16 hex digits of NotAfter
//	                      so that keys sort by NotAfter, then serial
//	p svid/s/<serial>     -> the row's key: one row per serial
//	p audit/<hlc>-<tag>   audit events, newest first; <hlc> is 16 hex digits
//	                      of the bitwise NOT of a per-store hybrid clock
//	                      (wall nanoseconds, strictly increasing)
//	p crl/<ca id>         last CRL number handed out
//	p replica/<id>        Announce records, bound to a lease
//	p election/           concurrency.Election keys
//
// Values are JSON of the store types: readable with etcdctl, a few hundred
// bytes an inventory row, and boltstore's hand-made codec is internal to it.
//
// Every write is one etcd transaction carrying its preconditions
// (CreateRevision == 0 for create-if-absent, ModRevision for
// read-modify-write, retried on conflict), so replicas racing on the same
// key get exactly one winner.
//
// Revision and Watch: etcd's revision also moves on writes of unwatched
// state (inventory, audit), so every transaction that changes watched state
// also puts p w/rev, and Revision is that key's ModRevision. A consumer
// waiting for the Revision read after its write is then woken by the
// watch response of that very write; progress notifications would instead
// need a timer (etcd sends them every 10 minutes by default, or on request
// per stream) on every wait.
//
// Key space bound: inventory rows are pruned by the leader (PruneSVIDs),
// revoked serials leave after expiry, and the store compacts etcd's history
// itself while it holds the leadership: every Options.CompactInterval (5 min)
// to the revision it saw one interval earlier, as kube-apiserver does. A
// watch that falls behind a compaction ends with store.ErrCompacted and the
// consumer re-lists. The audit trail is kept whole, as boltstore keeps it.
package etcdstore

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/meshid/meshid/store"
)

// DefaultPrefix is the key prefix when Options.Prefix is empty.
const DefaultPrefix = "/meshid/"

// DefaultLeaseTTL is the leader election lease when Options.LeaseTTL is 0:
// a dead leader is replaced within it.
const DefaultLeaseTTL = 10 * time.Second

// DefaultCompactInterval is Options.CompactInterval when 0.
const DefaultCompactInterval = 5 * time.Minute

// Options configures Open.
type Options struct {
	// Endpoints are the etcd client URLs (https://e1:2379, ...).
	Endpoints []string
	// TLS is the client TLS config (CA, client cert); nil for plain http
	// endpoints (tests on loopback).
	TLS *tls.Config
	// Prefix is prepended to every key, so several meshid planes (or a
	// test per prefix) can share one etcd; DefaultPrefix when empty. It
	// must end in "/".
	Prefix string
	// Replica names this process in the election and in Cluster (default:
	// the host name and pid).
	Replica string
	// LeaseTTL is the election lease; DefaultLeaseTTL when 0. etcd counts
	// leases in whole seconds, so it is rounded up to one.
	LeaseTTL time.Duration
	// DialTimeout bounds the first connection (default 5s); RequestTimeout
	// bounds each write, after which it fails with store.ErrUnavailable
	// (default 5s).
	DialTimeout, RequestTimeout time.Duration
	Logger                      *slog.Logger
	// Now stamps what the store itself decides by time (token expiry in
	// UseToken is the caller's now).
	Now func() time.Time
	// HealthInterval is how often Health is re-probed with a quorum read
	// (default 1s).
	HealthInterval time.Duration
	// CompactInterval is how often the leader compacts etcd's history, to
	// the revision seen one interval before; DefaultCompactInterval when
	// 0, never when negative.
	CompactInterval time.Duration
}

// Store is a store.Store on etcd.
type Store struct {
	cli  *clientv3.Client
	opts Options
	log  *slog.Logger
	now  func() time.Time
	tag  string // distinguishes this store's audit keys from other replicas'

	k keys

	ctx       context.Context // cancelled by Close: ends every goroutine
	cancel    context.CancelFunc
	closed    atomic.Bool
	closeOnce sync.Once
	wg        sync.WaitGroup

	health atomic.Pointer[error]

	leaderSem chan struct{}
	lmu       sync.Mutex
	lead      *leadership

	gc *groupCommit

	hlcMu   sync.Mutex
	hlcLast int64

	annMu   sync.Mutex
	annSess *concurrency.Session

	// pruneListed, if set (tests only), runs in PruneSVIDs between a
	// chunk's listing and its delete: where another replica's write lands.
	pruneListed func()
}

type keys struct {
	p, w, marker, entry, ca, revoked, token, agent, crls, uniq, svidX, svidS, audit, crl, replica, election string
}

func newKeys(p string) keys {
	return keys{
		p: p, w: p + "w/", marker: p + "w/rev",
		entry: p + "w/entry/", ca: p + "w/ca/", revoked: p + "w/revoked/", token: p + "w/token/", agent: p + "w/agent/", crls: p + "w/crls",
		uniq: p + "uniq/", svidX: p + "svid/x/", svidS: p + "svid/s/", audit: p + "audit/", crl: p + "crl/",
		replica: p + "replica/", election: p + "election/",
	}
}

var (
	_ store.Store     = (*Store)(nil)
	_ store.Migrator  = (*Store)(nil)
	_ store.Clustered = (*Store)(nil)
)

// Open connects to etcd and returns a Store once a linearizable read has
// succeeded, so a misconfigured endpoint fails at start-up.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if len(opts.Endpoints) == 0 {
		return nil, fmt.Errorf("etcdstore: no endpoints: %w", store.ErrInvalid)
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Prefix[len(opts.Prefix)-1] != '/' {
		return nil, fmt.Errorf("etcdstore: prefix %q must end in /: %w", opts.Prefix, store.ErrInvalid)
	}
	if opts.Replica == "" {
		host, _ := os.Hostname()
		opts.Replica = host + "-" + strconv.Itoa(os.Getpid())
	}
	if opts.LeaseTTL <= 0 {
		opts.LeaseTTL = DefaultLeaseTTL
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = 5 * time.Second
	}
	if opts.HealthInterval <= 0 {
		opts.HealthInterval = time.Second
	}
	if opts.CompactInterval == 0 {
		opts.CompactInterval = DefaultCompactInterval
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   opts.Endpoints,
		TLS:         opts.TLS,
		DialTimeout: opts.DialTimeout,
		// A dead member's connection is noticed within seconds, not
		// after the kernel's TCP timeout.
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Logger:               zap.NewNop(),
		Context:              context.Background(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcdstore: connect to etcd %v: %v: %w", opts.Endpoints, err, store.ErrUnavailable)
	}
	var tag [4]byte
	_, _ = rand.Read(tag[:])
	s := &Store{cli: cli, opts: opts, log: log, now: opts.Now, tag: hex.EncodeToString(tag[:]), k: newKeys(opts.Prefix), leaderSem: make(chan struct{}, 1)}
	rctx, cancel := context.WithTimeout(ctx, opts.DialTimeout)
	_, err = cli.Get(rctx, s.k.marker)
	cancel()
	if err != nil {
		cli.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("etcdstore: open: %w", ctx.Err())
		}
		return nil, fmt.Errorf("etcdstore: first read from etcd %v: %v: %w", opts.Endpoints, err, store.ErrUnavailable)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.gc = newGroupCommit(s)
	s.wg.Add(2)
	go s.healthLoop()
	go s.compactLoop()
	return s, nil
}

// Close resigns a held leadership, revokes this store's leases, waits for
// pending RecordSVID commits and stops every goroutine. It may be called
// more than once.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.gc.close()
		s.lmu.Lock()
		l := s.lead
		s.lmu.Unlock()
		if l != nil {
			ctx, cancel := context.WithTimeout(context.Background(), s.opts.RequestTimeout)
			_ = l.Resign(ctx)
			cancel()
		}
		s.annMu.Lock()
		if s.annSess != nil {
			_ = s.annSess.Close()
		}
		s.annMu.Unlock()
		s.cancel()
		s.wg.Wait()
		_ = s.cli.Close()
	})
	return nil
}

// Client returns the etcd client (tests compact and inspect with it).
func (s *Store) Client() *clientv3.Client { return s.cli }

// Prefix returns the key prefix in use.
func (s *Store) Prefix() string { return s.k.p }

func (s *Store) check(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return ctx.Err()
}

// rctx bounds one request by RequestTimeout.
func (s *Store) rctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.opts.RequestTimeout)
}

// fail maps an etcd error: the caller's own cancellation stays itself,
// everything else means etcd could not do it (no quorum, no member
// reachable, the request timed out) and wraps store.ErrUnavailable.
func (s *Store) fail(ctx context.Context, what string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%s: %w", what, cerr)
	}
	if s.closed.Load() && errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s: %w", what, store.ErrClosed)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// Our RequestTimeout: etcd neither committed nor refused.
		return fmt.Errorf("%s: etcd %v did not answer within %v (no quorum, or no member reachable): %w: %w", what, s.opts.Endpoints, s.opts.RequestTimeout, err, store.ErrUnavailable)
	}
	return fmt.Errorf("%s: etcd %v: %w: %w", what, s.opts.Endpoints, err, store.ErrUnavailable)
}

func isCompacted(err error) bool {
	return errors.Is(err, rpctypes.ErrCompacted) || errors.Is(err, rpctypes.ErrGRPCCompacted)
}

// txn runs one transaction bounded by RequestTimeout.
func (s *Store) txn(ctx context.Context, what string, cmps []clientv3.Cmp, then []clientv3.Op, els ...clientv3.Op) (*clientv3.TxnResponse, error) {
	rctx, cancel := s.rctx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(rctx).If(cmps...).Then(then...).Else(els...).Commit()
	if err != nil {
		return nil, s.fail(ctx, what, err)
	}
	return resp, nil
}

// get is a linearizable read bounded by RequestTimeout.
func (s *Store) get(ctx context.Context, what, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	rctx, cancel := s.rctx(ctx)
	defer cancel()
	resp, err := s.cli.Get(rctx, key, opts...)
	if err != nil {
		return nil, s.fail(ctx, what, err)
	}
	return resp, nil
}

// read is get for methods that only read: while etcd has no quorum (Health
// failing, or this read timing out) it falls back to a serializable read
// from whichever member answers, so listings keep working, possibly stale,
// as store.ErrUnavailable promises.
func (s *Store) read(ctx context.Context, what, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	var err error
	if s.Health() == nil {
		var resp *clientv3.GetResponse
		if resp, err = s.get(ctx, what, key, opts...); err == nil || !errors.Is(err, store.ErrUnavailable) {
			return resp, err
		}
	}
	resp, serr := s.get(ctx, what, key, append(opts, clientv3.WithSerializable())...)
	if serr != nil {
		if err != nil {
			return nil, err
		}
		return nil, serr
	}
	return resp, nil
}

// marker is the op every transaction changing watched state carries.
func (s *Store) marker() clientv3.Op { return clientv3.OpPut(s.k.marker, "") }

// Health is nil while the last quorum read succeeded; otherwise an error
// wrapping store.ErrUnavailable naming etcd and the cause.
func (s *Store) Health() error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if p := s.health.Load(); p != nil {
		return *p
	}
	return nil
}

func (s *Store) healthLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
		_, err := s.cli.Get(ctx, s.k.marker)
		cancel()
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			herr := fmt.Errorf("etcdstore: no quorum read from etcd %v: %v: %w", s.opts.Endpoints, err, store.ErrUnavailable)
			if s.health.Swap(&herr) == nil {
				s.log.Warn("etcd unavailable", "err", err)
			}
		} else if s.health.Swap(nil) != nil {
			s.log.Info("etcd available again")
		}
	}
}

// compactLoop compacts etcd's history while this store leads: each tick to
// the revision seen at the tick before, so watchers get one interval of
// history to catch up in.
func (s *Store) compactLoop() {
	defer s.wg.Done()
	if s.opts.CompactInterval < 0 {
		return
	}
	t := time.NewTicker(s.opts.CompactInterval)
	defer t.Stop()
	var prev int64
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.RequestTimeout)
		resp, err := s.cli.Get(ctx, s.k.marker, clientv3.WithCountOnly())
		if err == nil {
			if prev > 0 && s.leading() {
				if _, err := s.cli.Compact(ctx, prev); err != nil && !isCompacted(err) {
					s.log.Warn("etcd compaction failed", "revision", prev, "err", err)
				} else {
					s.log.Debug("compacted etcd history", "revision", prev)
				}
			}
			prev = resp.Header.Revision
		}
		cancel()
	}
}

// Compact drops etcd's history before rev (store/storetest.Compacter): a
// watch from before it fails with store.ErrCompacted.
func (s *Store) Compact(ctx context.Context, rev int64) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	rctx, cancel := s.rctx(ctx)
	defer cancel()
	if _, err := s.cli.Compact(rctx, rev); err != nil && !isCompacted(err) {
		return s.fail(ctx, "compact", err)
	}
	return nil
}

// nextAuditKey returns a key later than every audit key this store wrote.
func (s *Store) nextAuditKey() string {
	s.hlcMu.Lock()
	n := max(time.Now().UnixNano(), s.hlcLast+1)
	s.hlcLast = n
	s.hlcMu.Unlock()
	// Inverted, so that keys ascend from the newest: ListAudit is then a
	// plain limited range, which etcd serves without reading the whole
	// trail (a descending sort makes it read and sort every key).
	return fmt.Sprintf("%s%016x-%s", s.k.audit, ^uint64(n), s.tag)
}

func (s *Store) auditOp(ev store.AuditEvent) (clientv3.Op, error) {
	if ev.Time.IsZero() {
		ev.Time = s.now()
	}
	v, err := marshal(&ev)
	if err != nil {
		return clientv3.Op{}, err
	}
	return clientv3.OpPut(s.nextAuditKey(), v), nil
}

// withAudit appends the audit op (if audit is not nil) to ops.
func (s *Store) withAudit(ops []clientv3.Op, audit *store.AuditEvent) ([]clientv3.Op, error) {
	if audit == nil {
		return ops, nil
	}
	op, err := s.auditOp(*audit)
	if err != nil {
		return nil, err
	}
	return append(ops, op), nil
}

// AppendAudit records an admin action that has no store change of its own.
// A zero Time is replaced by Options.Now.
func (s *Store) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	op, err := s.auditOp(ev)
	if err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	_, err = s.txn(ctx, "append audit", nil, []clientv3.Op{op})
	return err
}

// ListAudit returns the newest events first, at most limit (0: all).
func (s *Store) ListAudit(ctx context.Context, limit int) ([]store.AuditEvent, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("list audit: negative limit: %w", store.ErrInvalid)
	}
	resp, err := s.read(ctx, "list audit", s.k.audit, clientv3.WithPrefix(), clientv3.WithLimit(int64(limit)))
	if err != nil {
		return nil, err
	}
	var out []store.AuditEvent
	for _, kv := range resp.Kvs {
		var ev store.AuditEvent
		if err := unmarshal(kv.Value, &ev); err != nil {
			return nil, fmt.Errorf("audit event %s: %w", kv.Key, err)
		}
		out = append(out, ev)
	}
	return out, nil
}
