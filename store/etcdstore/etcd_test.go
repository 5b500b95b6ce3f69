package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

var (
	bg  = context.Background()
	t0  = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	nop = store.AuditEvent{Time: t0, Actor: "test", Action: "test"}
)

func testEntry(id, spiffeID string) store.Entry {
	return store.Entry{ID: id, SpiffeID: spiffeID, TTL: time.Hour, CreatedAt: t0,
		Selectors: []store.Selector{{Type: "unix", Value: "uid:1"}}}
}

func testSVID(i int) store.IssuedSVID {
	na := t0.Add(time.Duration(i%50) * time.Minute)
	return store.IssuedSVID{Serial: fmt.Sprintf("%032x", i), SpiffeID: "spiffe://example.org/w", NotBefore: na.Add(-time.Hour), NotAfter: na, CAID: "ca", IssuedAt: na.Add(-time.Hour)}
}

// openSame opens a second store (another replica) on s's prefix.
func openSame(t *testing.T, s *Store, o Options) *Store {
	t.Helper()
	o.Endpoints, o.Prefix = s.opts.Endpoints, s.k.p
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 2 * time.Second
	}
	if o.TLS == nil {
		o.TLS = s.opts.TLS
	}
	s2, err := Open(bg, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s2.Close() })
	return s2
}

// TestReplicaRaces has two stores on one prefix (two replicas) race many
// goroutines on the same entry, single-use token, CRL counter and agent
// record: exactly one winner each, and no update lost.
func TestReplicaRaces(t *testing.T) {
	a := openShared(t, Options{Replica: "a"})
	b := openSame(t, a, Options{Replica: "b"})
	stores := []*Store{a, b}
	if err := a.CreateToken(bg, store.JoinToken{Hash: "tok", SpiffeID: "spiffe://example.org/n", ExpiresAt: t0.Add(time.Hour), SingleUse: true}, nop); err != nil {
		t.Fatal(err)
	}
	const n = 16
	var (
		wg                            sync.WaitGroup
		entryWins, tokenWins, attests atomic.Int32
		mu                            sync.Mutex
		crls                          = map[int64]bool{}
		errs                          = make(chan error, 10*n)
	)
	for i := range n {
		s := stores[i%2]
		wg.Go(func() {
			err := s.CreateEntry(bg, testEntry(fmt.Sprintf("e%02d", i), "spiffe://example.org/same"), nop)
			switch {
			case err == nil:
				entryWins.Add(1)
			case !errors.Is(err, store.ErrAlreadyExists):
				errs <- err
			}
		})
		wg.Go(func() {
			_, err := s.UseToken(bg, "tok", t0, fmt.Sprintf("conn%d", i))
			switch {
			case err == nil:
				tokenWins.Add(1)
			case !errors.Is(err, store.ErrNotFound):
				errs <- err
			}
		})
		wg.Go(func() {
			c, err := s.NextCRLNumber(bg, "ca", 1)
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if crls[c] {
				errs <- fmt.Errorf("CRL number %d handed out twice", c)
			}
			crls[c] = true
		})
		wg.Go(func() {
			_, err := s.UpdateAgent(bg, "agent", func(r *store.AgentRecord, _ bool) error {
				r.NodeSVIDs = append(r.NodeSVIDs, store.AgentSVID{Serial: "s", NotAfter: t0})
				if len(r.NodeSVIDs) > maxAgentSVIDs {
					r.NodeSVIDs = r.NodeSVIDs[1:]
				}
				r.Node = fmt.Sprint(len(r.Selectors) + 1)
				r.Selectors = append(r.Selectors, fmt.Sprint(i))
				return nil
			}, nil)
			if err != nil {
				errs <- err
			} else {
				attests.Add(1)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if entryWins.Load() != 1 || tokenWins.Load() != 1 {
		t.Fatalf("%d entry creates and %d token redemptions won, want 1 each", entryWins.Load(), tokenWins.Load())
	}
	if len(crls) != n {
		t.Fatalf("%d distinct CRL numbers for %d calls", len(crls), n)
	}
	rec, err := b.GetAgent(bg, "agent")
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Selectors) != n {
		t.Fatalf("agent record holds %d of %d updates: some were lost", len(rec.Selectors), n)
	}
	es, _, err := b.ListEntries(bg, store.EntryQuery{})
	if err != nil || len(es) != 1 {
		t.Fatalf("entries after the race: %v, %v", es, err)
	}
}

// TestGroupCommit records many rows from concurrent callers and checks,
// through etcd's revision (one per transaction), that they shared
// transactions.
func TestGroupCommit(t *testing.T) {
	s := openShared(t, Options{})
	before, err := s.cli.Get(bg, "x")
	if err != nil {
		t.Fatal(err)
	}
	const n = 600
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			if err := s.RecordSVID(bg, testSVID(i)); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	after, err := s.cli.Get(bg, "x")
	if err != nil {
		t.Fatal(err)
	}
	txns := after.Header.Revision - before.Header.Revision
	if txns > n/4 {
		t.Fatalf("%d rows took %d transactions: not group-committed", n, txns)
	}
	rows, _, err := s.ListSVIDs(bg, store.SVIDQuery{})
	if err != nil || len(rows) != n {
		t.Fatalf("ListSVIDs: %d rows, %v", len(rows), err)
	}
	t.Logf("%d rows in %d transactions", n, txns)
	// Pruning in chunks removes exactly the expired rows and their serials.
	cut := t0.Add(25 * time.Minute)
	pruned, err := s.PruneSVIDs(bg, cut)
	if err != nil || pruned != n/2 {
		t.Fatalf("PruneSVIDs = %d, %v; want %d", pruned, err, n/2)
	}
	if err := s.RecordSVID(bg, testSVID(0)); err != nil {
		t.Fatalf("a pruned serial is recorded again: %v", err)
	}
	if err := s.RecordSVID(bg, testSVID(49)); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("a kept serial again: %v, want ErrAlreadyExists", err)
	}
}

// TestLeaderFencing: of two replicas one leads; the other's PutCA is
// refused and writes nothing; when the leader's lease is lost (revoked as
// an expiry would) its own PutCA is refused at once and the other takes
// over; after Close of the new leader the first takes over again within
// the lease TTL.
func TestLeaderFencing(t *testing.T) {
	a := openShared(t, Options{Replica: "a"})
	b := openSame(t, a, Options{Replica: "b"})
	la, err := a.Campaign(bg)
	if err != nil {
		t.Fatal(err)
	}
	bLeads := make(chan store.Leadership, 1)
	go func() {
		l, err := b.Campaign(bg)
		if err != nil {
			close(bLeads)
			return
		}
		bLeads <- l
	}()
	ca := store.CARecord{ID: "ca-1", Kind: "x509", State: store.CAPrepared, CreatedAt: t0}
	if err := b.PutCA(bg, ca, &nop); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("non-leader PutCA: %v, want ErrNotLeader", err)
	}
	if cas, err := a.ListCAs(bg); err != nil || len(cas) != 0 {
		t.Fatalf("after a refused PutCA: %v, %v", cas, err)
	}
	if au, _ := a.ListAudit(bg, 0); len(au) != 0 {
		t.Fatalf("a refused PutCA wrote audit %v", au)
	}
	if err := a.PutCA(bg, ca, nil); err != nil {
		t.Fatalf("leader PutCA: %v", err)
	}
	// The signed CRL set every replica serves is the leader's alone.
	crls := store.SignedCRLs{Covers: "ca-1;", Number: 1, SignedAt: t0, RefreshAt: t0.Add(time.Hour), DER: [][]byte{{0x30}}}
	if err := b.PutCRLs(bg, crls); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("non-leader PutCRLs: %v, want ErrNotLeader", err)
	}
	if _, err := a.GetCRLs(bg); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("after a refused PutCRLs: %v, want ErrNotFound", err)
	}
	if err := a.PutCRLs(bg, crls); err != nil {
		t.Fatalf("leader PutCRLs: %v", err)
	}
	st, err := b.Cluster(bg)
	if err != nil || st.Leader != "a" {
		t.Fatalf("Cluster leader = %q, %v; want a", st.Leader, err)
	}
	// The leader's lease ends without it knowing yet.
	if _, err := b.cli.Revoke(bg, la.(*leadership).sess.Lease()); err != nil {
		t.Fatal(err)
	}
	ca.State = store.CAActive
	if err := a.PutCA(bg, ca, nil); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("PutCA after the lease was lost: %v, want ErrNotLeader", err)
	}
	crls.Number = 2
	if err := a.PutCRLs(bg, crls); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("PutCRLs after the lease was lost: %v, want ErrNotLeader", err)
	}
	select {
	case <-la.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("leadership not done after its lease was revoked")
	}
	var lb store.Leadership
	select {
	case lb = <-bLeads:
		if lb == nil {
			t.Fatal("b's campaign failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("b did not take over")
	}
	if err := b.PutCA(bg, ca, nil); err != nil {
		t.Fatalf("new leader PutCA: %v", err)
	}
	aLeads := make(chan error, 1)
	start := time.Now()
	go func() { _, err := a.Campaign(bg); aLeads <- err }()
	// Wait for a's campaign key, so the takeover is the election's doing.
	waitFor(t, func() bool {
		r, _ := a.cli.Get(bg, a.k.election, clientv3.WithPrefix(), clientv3.WithCountOnly())
		return r != nil && r.Count == 2
	})
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-aLeads:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(a.opts.LeaseTTL + time.Second):
		t.Fatal("a did not take over within the lease TTL after b closed")
	}
	t.Logf("takeover after Close in %v", time.Since(start))
	got, _ := a.ListCAs(bg)
	if len(got) != 1 || got[0].State != store.CAActive {
		t.Fatalf("CAs = %+v", got)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(10 * time.Millisecond) // polling a condition with a deadline
	}
}

// TestCompactedWatch: a watch from before an etcd compaction fails with
// ErrCompacted; a live watcher keeps going across the compaction.
func TestCompactedWatch(t *testing.T) {
	s := openShared(t, Options{})
	rev0, _ := s.Revision(bg)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	live, err := s.Watch(ctx, rev0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := s.CreateEntry(bg, testEntry(fmt.Sprint("c", i), fmt.Sprint("spiffe://example.org/c", i)), nop); err != nil {
			t.Fatal(err)
		}
	}
	var keys []string
	recv := func(n int) {
		t.Helper()
		for len(keys) < n {
			select {
			case r, ok := <-live.Responses():
				if !ok {
					t.Fatalf("live watch ended: %v", live.Err())
				}
				for _, ev := range r.Events {
					keys = append(keys, ev.Key)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("live watch got %v only", keys)
			}
		}
	}
	// The live watch has delivered what it will be compacted past: a
	// watcher still behind a compaction ends with ErrCompacted, by design.
	recv(3)
	rev, _ := s.Revision(bg)
	if _, err := s.cli.Compact(bg, rev); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Watch(ctx, rev0); !errors.Is(err, store.ErrCompacted) {
		t.Fatalf("watch from before the compaction: %v, want ErrCompacted", err)
	}
	if err := s.CreateEntry(bg, testEntry("after", "spiffe://example.org/after"), nop); err != nil {
		t.Fatal(err)
	}
	recv(4)
	if want := []string{"c0", "c1", "c2", "after"}; !reflect.DeepEqual(keys, want) {
		t.Fatalf("live watch keys %v, want %v", keys, want)
	}
}

// TestMigrate exports a store with every kind of state, imports it into an
// empty prefix and compares; an import into a non-empty prefix is refused.
func TestMigrate(t *testing.T) {
	src := openShared(t, Options{})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(src.PutCA(bg, store.CARecord{ID: "ca", Kind: "x509", State: store.CAActive, CertDER: []byte{1, 2}, CreatedAt: t0}, nil))
	must(src.CreateEntry(bg, testEntry("e1", "spiffe://example.org/e1"), nop))
	must(src.RecordSVID(bg, testSVID(1)))
	must(src.CreateToken(bg, store.JoinToken{Hash: "h", SpiffeID: "spiffe://example.org/n", ExpiresAt: t0.Add(time.Hour)}, nop))
	must(src.RevokeSerials(bg, []store.RevokedSerial{{Serial: "01", CAID: "ca", NotAfter: t0}}, nop))
	must(src.PutAgent(bg, store.AgentRecord{ID: "spiffe://example.org/agent", Method: "join_token"}, nil))
	if _, err := src.NextCRLNumber(bg, "ca", 7); err != nil {
		t.Fatal(err)
	}
	snap, err := src.Export(bg)
	must(err)
	if len(snap.CAs) != 1 || len(snap.Entries) != 1 || len(snap.SVIDs) != 1 || len(snap.Tokens) != 1 || len(snap.Revoked) != 1 || len(snap.Agents) != 1 || len(snap.Audit) != 3 || snap.CRLNumbers["ca"] != 7 {
		t.Fatalf("export = %+v", snap)
	}
	dst := openShared(t, Options{})
	must(dst.Import(bg, snap))
	again, err := dst.Export(bg)
	must(err)
	if !reflect.DeepEqual(snap, again) {
		t.Fatalf("round trip differs:\n%+v\n%+v", snap, again)
	}
	// The uniqueness claim came along.
	if err := dst.CreateEntry(bg, testEntry("e2", "spiffe://example.org/e1"), nop); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("duplicate after import: %v", err)
	}
	// Events written after the import are newer than the imported ones.
	if err := dst.AppendAudit(bg, store.AuditEvent{Time: t0, Actor: "test", Action: "after.import"}); err != nil {
		t.Fatal(err)
	}
	if au, err := dst.ListAudit(bg, 0); err != nil || len(au) != 4 || au[0].Action != "after.import" || !reflect.DeepEqual(au[1:], []store.AuditEvent{snap.Audit[2], snap.Audit[1], snap.Audit[0]}) {
		t.Fatalf("audit after import: %+v, %v", au, err)
	}
	if err := dst.Import(bg, snap); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("import into a non-empty prefix: %v", err)
	}
}

// TestLeaderCompacts: the leading store compacts etcd's history by itself,
// to the revision it saw one interval earlier; a store that does not lead
// does not.
func TestLeaderCompacts(t *testing.T) {
	s := openShared(t, Options{CompactInterval: 100 * time.Millisecond})
	if err := s.CreateEntry(bg, testEntry("e", "spiffe://example.org/e"), nop); err != nil {
		t.Fatal(err)
	}
	rev, _ := s.Revision(bg)
	compacted := func() bool {
		_, err := s.cli.Get(bg, s.k.marker, clientv3.WithRev(rev-1))
		return err != nil && isCompacted(err)
	}
	if compacted() {
		t.Fatal("history compacted before the test")
	}
	l, err := s.Campaign(bg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Resign(bg)
	waitFor(t, compacted)
	if _, err := s.Watch(bg, rev-1); !errors.Is(err, store.ErrCompacted) {
		t.Fatalf("watch from before the leader's compaction: %v, want ErrCompacted", err)
	}
}

// TestCloseWaitsForRecordSVID closes a store while callers are recording:
// every call that returned nil has its row, later ones fail with ErrClosed.
func TestCloseWaitsForRecordSVID(t *testing.T) {
	s := openShared(t, Options{})
	const n = 300
	var wg sync.WaitGroup
	var ok sync.Map
	started := make(chan struct{}, n)
	for i := range n {
		wg.Go(func() {
			started <- struct{}{}
			err := s.RecordSVID(bg, testSVID(i))
			switch {
			case err == nil:
				ok.Store(testSVID(i).Serial, true)
			case !errors.Is(err, store.ErrClosed):
				t.Errorf("RecordSVID during Close: %v", err)
			}
		})
	}
	for range n / 2 {
		<-started
	}
	// Close while rows are queued or in flight.
	waitFor(t, func() bool {
		s.gc.mu.Lock()
		defer s.gc.mu.Unlock()
		return len(s.gc.pending) > 0
	})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	r := openSame(t, s, Options{})
	rows, _, err := r.ListSVIDs(bg, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, row := range rows {
		have[row.Serial] = true
	}
	acked := 0
	ok.Range(func(k, _ any) bool {
		acked++
		if !have[k.(string)] {
			t.Errorf("acknowledged serial %s missing", k)
		}
		return true
	})
	if acked == 0 {
		t.Fatal("no call succeeded before Close")
	}
	t.Logf("%d acknowledged, %d rows", acked, len(rows))
}

// TestWatchOverflowResumes: a consumer that stops reading while more
// commits arrive than the watch buffers gets every one of them, once and in
// order, when it reads again (the etcd watch is paused and resumed from
// etcd's history, not dropped).
func TestWatchOverflowResumes(t *testing.T) {
	s := openShared(t, Options{})
	rev, _ := s.Revision(bg)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	w, err := s.Watch(ctx, rev)
	if err != nil {
		t.Fatal(err)
	}
	const n = 3 * (watchChan + watchQueue)
	for i := range n {
		if err := s.RevokeSerials(bg, []store.RevokedSerial{{Serial: fmt.Sprintf("%04d", i), NotAfter: t0}}, nop); err != nil {
			t.Fatal(err)
		}
	}
	last := rev
	for i := range n {
		select {
		case r, ok := <-w.Responses():
			if !ok {
				t.Fatalf("watch ended after %d: %v", i, w.Err())
			}
			if r.Revision <= last || len(r.Events) != 1 || r.Events[0].Key != fmt.Sprintf("%04d", i) {
				t.Fatalf("response %d: %+v after revision %d", i, r, last)
			}
			last = r.Revision
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d of %d responses", i, n)
		}
	}
}
