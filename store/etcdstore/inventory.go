package etcdstore

import (
	"context"
	"encoding/hex"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// svidChunk rows go in one transaction: each row is a compare (serial
// absent) and two puts, the chunk puts a key per CA in it (calast.go), and
// etcd's default --max-txn-ops of 128 bounds the puts: 63 rows leave room
// for two CAs. At ~300 bytes a row a chunk stays far below the 1.5 MiB
// request limit.
const svidChunk = 63

var (
	minNanoTime = time.Unix(0, math.MinInt64)
	maxNanoTime = time.Unix(0, math.MaxInt64)
)

func nanosInRange(t time.Time) bool { return !t.Before(minNanoTime) && !t.After(maxNanoTime) }

// expHex is NotAfter as 16 hex digits that sort as the time does.
func expHex(nanos int64) string { return fmt.Sprintf("%016x", uint64(nanos)^(1<<63)) }

func (s *Store) svidKey(r *store.IssuedSVID) string {
	return s.k.svidX + expHex(r.NotAfter.UnixNano()) + r.Serial
}

type svidReq struct {
	rec  store.IssuedSVID
	val  string
	done chan error
}

// groupCommit batches concurrent RecordSVID callers: while one flush is
// in etcd, new rows queue, and the next flush takes them all, in chunks of
// svidChunk sent in parallel.
type groupCommit struct {
	s       *Store
	mu      sync.Mutex
	pending []*svidReq
	closed  bool
	kick    chan struct{}
	stopped chan struct{}
}

func newGroupCommit(s *Store) *groupCommit {
	g := &groupCommit{s: s, kick: make(chan struct{}, 1), stopped: make(chan struct{})}
	go g.run()
	return g
}

// close refuses new rows, lets the flusher commit the queued ones and
// waits for it.
func (g *groupCommit) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	select {
	case g.kick <- struct{}{}:
	default:
	}
	<-g.stopped
}

func (g *groupCommit) run() {
	defer close(g.stopped)
	for range g.kick {
		for {
			g.mu.Lock()
			batch, closed := g.pending, g.closed
			g.pending = nil
			g.mu.Unlock()
			if len(batch) == 0 {
				if closed {
					return
				}
				break
			}
			g.flush(batch)
		}
	}
}

// flush commits batch. A serial twice in the batch waits for the next
// flush, so it fails against the first's committed row.
func (g *groupCommit) flush(batch []*svidReq) {
	seen := make(map[string]bool, len(batch))
	var now, later []*svidReq
	for _, r := range batch {
		if seen[r.rec.Serial] {
			later = append(later, r)
			continue
		}
		seen[r.rec.Serial] = true
		now = append(now, r)
	}
	var wg sync.WaitGroup
	for c := range slices.Chunk(now, svidChunk) {
		wg.Go(func() { g.commit(c) })
	}
	wg.Wait()
	if len(later) > 0 {
		g.mu.Lock()
		g.pending = append(later, g.pending...)
		g.mu.Unlock()
	}
}

// commit writes one chunk; rows whose serial exists fail with
// ErrAlreadyExists and the rest are retried without them.
func (g *groupCommit) commit(c []*svidReq) {
	s := g.s
	if n := calastFit(c); n < len(c) {
		g.commit(c[n:])
		c = c[:n]
	}
	for len(c) > 0 {
		cmps := make([]clientv3.Cmp, 0, len(c))
		ops := make([]clientv3.Op, 0, 2*len(c))
		gets := make([]clientv3.Op, 0, len(c))
		for _, r := range c {
			sk, xk := s.k.svidS+r.rec.Serial, s.svidKey(&r.rec)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(sk), "=", 0))
			ops = append(ops, clientv3.OpPut(sk, xk), clientv3.OpPut(xk, r.val))
			gets = append(gets, clientv3.OpGet(sk, clientv3.WithCountOnly()))
		}
		ops = append(ops, s.calastOps(chunkRows(c))...)
		// Not the callers' contexts: the rows are shared, and a write
		// is bounded by RequestTimeout.
		resp, err := s.txn(context.Background(), fmt.Sprintf("record %d svids", len(c)), cmps, ops, gets...)
		if err != nil {
			for _, r := range c {
				r.done <- fmt.Errorf("record svid %s: %w", r.rec.Serial, err)
			}
			return
		}
		if resp.Succeeded {
			for _, r := range c {
				r.done <- nil
			}
			return
		}
		var rest []*svidReq
		for i, r := range c {
			if resp.Responses[i].GetResponseRange().Count > 0 {
				r.done <- fmt.Errorf("record svid %s: serial %w", r.rec.Serial, store.ErrAlreadyExists)
			} else {
				rest = append(rest, r)
			}
		}
		c = rest
	}
}

// RecordSVID durably records an issued SVID: it returns nil once the
// transaction holding its row has been committed by an etcd quorum.
func (s *Store) RecordSVID(ctx context.Context, rec store.IssuedSVID) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if rec.Serial == "" || len(rec.Serial) > 128 {
		return fmt.Errorf("record svid: serial must be 1..128 bytes: %w", store.ErrInvalid)
	}
	if rec.NotAfter.IsZero() || !nanosInRange(rec.NotAfter) {
		return fmt.Errorf("record svid %s: NotAfter %s out of range: %w", rec.Serial, rec.NotAfter, store.ErrInvalid)
	}
	val, _, err := roundTrip(&rec)
	if err != nil {
		return fmt.Errorf("record svid %s: %w", rec.Serial, err)
	}
	r := &svidReq{rec: rec, val: val, done: make(chan error, 1)}
	g := s.gc
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return fmt.Errorf("record svid: %w", store.ErrClosed)
	}
	g.pending = append(g.pending, r)
	g.mu.Unlock()
	select {
	case g.kick <- struct{}{}:
	default:
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		// The row may still be committed: the harmless direction.
		return fmt.Errorf("record svid %s: %w", rec.Serial, ctx.Err())
	}
}

// ListSVIDs pages through the inventory ordered by NotAfter, then Serial.
// The page token is the hex of the last row's key below p svid/x/.
func (s *Store) ListSVIDs(ctx context.Context, q store.SVIDQuery) ([]store.IssuedSVID, string, error) {
	if err := s.check(ctx); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list svids: negative page size: %w", store.ErrInvalid)
	}
	from := s.k.svidX
	end := clientv3.GetPrefixRangeEnd(s.k.svidX)
	if !q.NotExpiredAt.IsZero() {
		if !nanosInRange(q.NotExpiredAt) {
			return nil, "", fmt.Errorf("list svids: NotExpiredAt %s out of range: %w", q.NotExpiredAt, store.ErrInvalid)
		}
		if n := q.NotExpiredAt.UnixNano(); n < math.MaxInt64 {
			from = s.k.svidX + expHex(n+1)
		} else {
			return nil, "", nil
		}
	}
	if q.PageToken != "" {
		tok, err := hex.DecodeString(q.PageToken)
		if err != nil || len(tok) < 16 {
			return nil, "", fmt.Errorf("list svids: malformed page token: %w", store.ErrInvalid)
		}
		if _, err := hex.DecodeString(string(tok[:16])); err != nil {
			return nil, "", fmt.Errorf("list svids: malformed page token: %w", store.ErrInvalid)
		}
		if after := s.k.svidX + string(tok) + "\x00"; after > from {
			from = after
		}
	}
	if !q.ExpiringBefore.IsZero() {
		if !nanosInRange(q.ExpiringBefore) {
			return nil, "", fmt.Errorf("list svids: ExpiringBefore %s out of range: %w", q.ExpiringBefore, store.ErrInvalid)
		}
		if n := q.ExpiringBefore.UnixNano(); n < math.MaxInt64 {
			end = s.k.svidX + expHex(n+1)
		}
	}
	if from >= end {
		return nil, "", nil
	}
	opts := []clientv3.OpOption{clientv3.WithRange(end)}
	if q.PageSize > 0 {
		opts = append(opts, clientv3.WithLimit(int64(q.PageSize)+1))
	}
	resp, err := s.read(ctx, "list svids", from, opts...)
	if err != nil {
		return nil, "", err
	}
	kvs := resp.Kvs
	next := ""
	if q.PageSize > 0 && len(kvs) > q.PageSize {
		kvs = kvs[:q.PageSize]
		next = hex.EncodeToString([]byte(strings.TrimPrefix(string(kvs[len(kvs)-1].Key), s.k.svidX)))
	}
	if len(kvs) == 0 {
		return nil, "", nil
	}
	out := make([]store.IssuedSVID, len(kvs))
	for i, kv := range kvs {
		if err := unmarshal(kv.Value, &out[i]); err != nil {
			return nil, "", fmt.Errorf("svid %s: %w", kv.Key, err)
		}
	}
	return out, next, nil
}

// pruneChunk rows per transaction: two deletes a row (its index key and
// its serial key), within etcd's default --max-txn-ops of 128.
const pruneChunk = 64

// PruneSVIDs deletes rows whose NotAfter is before cutoff, in transactions
// of pruneChunk rows. Each row's two keys are deleted by name, never by a
// range: a row another replica records between the listing and the delete
// (a backdated NotAfter, or a clock behind this one) is not in the
// listing, so a range over it would take its index key and leave its
// serial key pointing at nothing. Named deletes leave it whole for the
// next pass.
func (s *Store) PruneSVIDs(ctx context.Context, cutoff time.Time) (int, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	if !nanosInRange(cutoff) {
		return 0, fmt.Errorf("prune svids: cutoff %s out of range: %w", cutoff, store.ErrInvalid)
	}
	end := s.k.svidX + expHex(cutoff.UnixNano())
	n := 0
	for {
		resp, err := s.get(ctx, "prune svids", s.k.svidX, clientv3.WithRange(end), clientv3.WithKeysOnly(), clientv3.WithLimit(pruneChunk))
		if err != nil {
			return n, err
		}
		if len(resp.Kvs) == 0 {
			break
		}
		if s.pruneListed != nil {
			s.pruneListed()
		}
		ops := make([]clientv3.Op, 0, 2*len(resp.Kvs))
		for _, kv := range resp.Kvs {
			serial := string(kv.Key)[len(s.k.svidX)+16:]
			ops = append(ops, clientv3.OpDelete(string(kv.Key)), clientv3.OpDelete(s.k.svidS+serial))
		}
		tr, err := s.txn(ctx, "prune svids", nil, ops)
		if err != nil {
			return n, err
		}
		for i := 0; i < len(tr.Responses); i += 2 {
			n += int(tr.Responses[i].GetResponseDeleteRange().Deleted)
		}
		if len(resp.Kvs) < pruneChunk {
			break
		}
	}
	if err := s.pruneCalast(ctx, cutoff); err != nil {
		return n, err
	}
	if n > 0 {
		s.log.Debug("pruned svid inventory", "rows", n, "cutoff", cutoff)
	}
	return n, nil
}
