package etcdstore

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/meshid/meshid/store"
)

// Announce registers r (ID defaults to Options.Replica) under p replica/
// on a lease of this store's, so the record goes when the store closes or
// the process dies.
func (s *Store) Announce(ctx context.Context, r store.Replica) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if r.ID == "" {
		r.ID = s.opts.Replica
	}
	s.annMu.Lock()
	defer s.annMu.Unlock()
	if s.annSess == nil {
		ttl := int(math.Ceil(s.opts.LeaseTTL.Seconds()))
		rctx, cancel := s.rctx(ctx)
		lease, err := s.cli.Grant(rctx, int64(ttl))
		cancel()
		if err != nil {
			return s.fail(ctx, "announce", err)
		}
		sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithContext(s.ctx))
		if err != nil {
			return s.fail(ctx, "announce", err)
		}
		s.annSess = sess
	}
	val, err := marshal(&r)
	if err != nil {
		return err
	}
	_, err = s.txn(ctx, "announce", nil, []clientv3.Op{clientv3.OpPut(s.k.replica+r.ID, val, clientv3.WithLease(s.annSess.Lease()))})
	return err
}

// Cluster reads the etcd members (MemberList, then Status of each client
// URL), the announced replicas and the election's current value.
func (s *Store) Cluster(ctx context.Context) (store.ClusterStatus, error) {
	st := store.ClusterStatus{Backend: "etcd", Self: s.opts.Replica}
	if err := s.check(ctx); err != nil {
		return st, err
	}
	rctx, cancel := s.rctx(ctx)
	ml, err := s.cli.MemberList(rctx)
	cancel()
	if err != nil {
		return st, s.fail(ctx, "cluster members", err)
	}
	st.Members = make([]store.Member, len(ml.Members))
	var wg sync.WaitGroup
	for i, m := range ml.Members {
		st.Members[i].Name = m.Name
		if len(m.ClientURLs) == 0 {
			st.Members[i].Error = "no client URL (not started)"
			continue
		}
		st.Members[i].Endpoint = m.ClientURLs[0]
		wg.Go(func() {
			mem := &st.Members[i]
			sctx, cancel := s.rctx(ctx)
			defer cancel()
			resp, err := s.cli.Status(sctx, mem.Endpoint)
			if err != nil {
				mem.Error = err.Error()
				return
			}
			mem.Revision, mem.DBSize = resp.Header.Revision, resp.DbSize
			mem.Leader = resp.Leader == resp.Header.MemberId
			mem.Healthy = resp.Leader != 0 && len(resp.Errors) == 0
			if len(resp.Errors) > 0 {
				mem.Error = strings.Join(resp.Errors, "; ")
			} else if resp.Leader == 0 {
				mem.Error = "no raft leader"
			}
		})
	}
	wg.Wait()
	if _, st.Replicas, err = s.Replicas(ctx); err != nil {
		return st, err
	}
	lead, err := s.get(ctx, "cluster leader", s.k.election, clientv3.WithFirstCreate()...)
	if err != nil {
		return st, err
	}
	if len(lead.Kvs) > 0 {
		st.Leader = string(lead.Kvs[0].Value)
	}
	if st.Revision, err = s.Revision(ctx); err != nil {
		return st, err
	}
	return st, nil
}

// Replicas reads the announced replicas.
func (s *Store) Replicas(ctx context.Context) (string, []store.Replica, error) {
	if err := s.check(ctx); err != nil {
		return s.opts.Replica, nil, err
	}
	rep, err := s.get(ctx, "cluster replicas", s.k.replica, clientv3.WithPrefix())
	if err != nil {
		return s.opts.Replica, nil, err
	}
	rs, err := decodeAll[store.Replica](rep)
	return s.opts.Replica, rs, err
}

// Export reads the whole prefix at one revision, in pages.
func (s *Store) Export(ctx context.Context) (store.Snapshot, error) {
	snap := store.Snapshot{CRLNumbers: map[string]int64{}}
	if err := s.check(ctx); err != nil {
		return snap, err
	}
	end := clientv3.GetPrefixRangeEnd(s.k.p)
	from := s.k.p
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(1000)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := s.get(ctx, "export", from, opts...)
		if err != nil {
			return snap, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			if err := s.exportKV(&snap, string(kv.Key), kv.Value); err != nil {
				return snap, fmt.Errorf("export %s: %w", kv.Key, err)
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	slices.Reverse(snap.Audit)
	// In ListCAs' order (keys are by ID).
	slices.SortStableFunc(snap.CAs, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return snap, nil
}

func (s *Store) exportKV(snap *store.Snapshot, key string, v []byte) error {
	switch {
	case strings.HasPrefix(key, s.k.ca):
		var r store.CARecord
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.CAs = append(snap.CAs, r)
	case strings.HasPrefix(key, s.k.entry):
		var r store.Entry
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.Entries = append(snap.Entries, r)
	case strings.HasPrefix(key, s.k.revoked):
		var r store.RevokedSerial
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.Revoked = append(snap.Revoked, r)
	case strings.HasPrefix(key, s.k.token):
		var r store.JoinToken
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.Tokens = append(snap.Tokens, r)
	case strings.HasPrefix(key, s.k.agent):
		var r store.AgentRecord
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.Agents = append(snap.Agents, r)
	case strings.HasPrefix(key, s.k.svidX):
		var r store.IssuedSVID
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.SVIDs = append(snap.SVIDs, r)
	case strings.HasPrefix(key, s.k.audit):
		var r store.AuditEvent
		if err := unmarshal(v, &r); err != nil {
			return err
		}
		snap.Audit = append(snap.Audit, r) // newest first; reversed at the end
	case strings.HasPrefix(key, s.k.crl):
		var n int64
		if _, err := fmt.Sscan(string(v), &n); err != nil {
			return err
		}
		snap.CRLNumbers[key[len(s.k.crl):]] = n
	}
	return nil
}

// importChunk ops per transaction, under etcd's default --max-txn-ops.
const importChunk = 120

// Import writes snap verbatim into an empty prefix: the first transaction
// requires the prefix to hold no key at all, so of two concurrent imports
// one fails with store.ErrAlreadyExists.
func (s *Store) Import(ctx context.Context, snap store.Snapshot) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	var ops []clientv3.Op
	add := func(key string, v any) error {
		val, err := marshal(v)
		if err != nil {
			return fmt.Errorf("import %s: %w", key, err)
		}
		ops = append(ops, clientv3.OpPut(key, val))
		return nil
	}
	for i := range snap.CAs {
		if err := add(s.k.ca+snap.CAs[i].ID, &snap.CAs[i]); err != nil {
			return err
		}
	}
	for i := range snap.Entries {
		e := &snap.Entries[i]
		if err := add(s.k.entry+e.ID, e); err != nil {
			return err
		}
		ops = append(ops, clientv3.OpPut(s.uniqKey(e), e.ID))
	}
	for i := range snap.SVIDs {
		r := &snap.SVIDs[i]
		xk := s.svidKey(r)
		if err := add(xk, r); err != nil {
			return err
		}
		ops = append(ops, clientv3.OpPut(s.k.svidS+r.Serial, xk))
	}
	for i := range snap.Audit {
		// Imported events keep their order, and sort after (older than)
		// every key a store writes later: those invert the wall clock in
		// nanoseconds, these the index.
		if err := add(fmt.Sprintf("%s%016x-import", s.k.audit, ^uint64(i)), &snap.Audit[i]); err != nil {
			return err
		}
	}
	for i := range snap.Tokens {
		if err := add(s.k.token+snap.Tokens[i].Hash, &snap.Tokens[i]); err != nil {
			return err
		}
	}
	for i := range snap.Revoked {
		if err := add(s.k.revoked+snap.Revoked[i].Serial, &snap.Revoked[i]); err != nil {
			return err
		}
	}
	for i := range snap.Agents {
		if err := add(s.k.agent+snap.Agents[i].ID, &snap.Agents[i]); err != nil {
			return err
		}
	}
	for id, n := range snap.CRLNumbers {
		ops = append(ops, clientv3.OpPut(s.k.crl+id, fmt.Sprint(n)))
	}
	// The CAs' last-NotAfter keys are rebuilt from the rows, not copied.
	ops = append(ops, s.calastOps(func(yield func(*store.IssuedSVID) bool) {
		for i := range snap.SVIDs {
			if !yield(&snap.SVIDs[i]) {
				return
			}
		}
	})...)
	ops = append(ops, clientv3.OpPut(s.calastDone(), ""), s.marker())
	first := true
	for len(ops) > 0 {
		n := min(len(ops), importChunk)
		var cmps []clientv3.Cmp
		if first {
			cmps = []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.k.p), "=", 0).WithPrefix()}
		}
		resp, err := s.txn(ctx, "import", cmps, ops[:n])
		if err != nil {
			return err
		}
		if !resp.Succeeded {
			return fmt.Errorf("import: prefix %s holds data: %w", s.k.p, store.ErrAlreadyExists)
		}
		first = false
		ops = ops[n:]
	}
	return nil
}
