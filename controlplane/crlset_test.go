package controlplane

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"math/big"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// crlFaultStore is a shared store whose PutCRLs fails on demand (a leader
// that cannot write its set) or waits at a gate (a slow write), and whose
// GetCRLs fails a given number of times.
type crlFaultStore struct {
	sharedStore
	fail     atomic.Bool
	gate     chan struct{} // if set, PutCRLs waits for it to close
	entered  chan struct{} // PutCRLs at the gate
	getFails atomic.Int32
}

func (f *crlFaultStore) PutCRLs(ctx context.Context, c store.SignedCRLs) error {
	if f.fail.Load() {
		return store.ErrUnavailable
	}
	if f.gate != nil {
		f.entered <- struct{}{}
		<-f.gate
	}
	return f.sharedStore.PutCRLs(ctx, c)
}

func (f *crlFaultStore) GetCRLs(ctx context.Context) (store.SignedCRLs, error) {
	if f.getFails.Add(-1) >= 0 {
		return store.SignedCRLs{}, store.ErrUnavailable
	}
	return f.sharedStore.GetCRLs(ctx)
}

func openClockedReplica(t *testing.T, st store.Store, kekFile string, fc *fakeclock.Clock) *Server {
	t.Helper()
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), Store: st, KEKFile: kekFile,
		SVIDTTL: time.Hour, CATTL: 48 * time.Hour, Now: fc.Now, AfterFunc: fc.AfterFunc})
	if err != nil {
		t.Fatalf("open replica: %v", err)
	}
	return srv
}

// servedSet is the CRL set s serves now.
func servedSet(s *Server) store.SignedCRLs {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	return *s.crl.served
}

// TestReplicasServeTheLeadersCRLs: every replica serves the CRLs the
// leader signed and stored, byte for byte, so the trust bundle has one
// version across replicas; a revocation through a follower reaches both
// that way. A leader that cannot store its set leaves the follower on its
// old CRLs only for crlLeaderGrace, then it signs its own; a new leader
// stores the set it serves.
func TestReplicasServeTheLeadersCRLs(t *testing.T) {
	ctx := context.Background()
	fc := fakeclock.New(time.Now())
	bs, kekFile := sharedBolt(t)
	aStore := &crlFaultStore{sharedStore: sharedStore{bs}}
	a := openClockedReplica(t, aStore, kekFile, fc)
	aClosed := false
	defer func() {
		if !aClosed {
			a.Close()
		}
	}()
	b := openClockedReplica(t, sharedStore{bs}, kekFile, fc)
	defer b.Close()
	if !a.Leading() || b.Leading() {
		t.Fatalf("leading: a %v, b %v; want a alone", a.Leading(), b.Leading())
	}
	same := func(when string) {
		t.Helper()
		sa, sb := servedSet(a), servedSet(b)
		if sa.Number != sb.Number || sa.Covers != sb.Covers || len(sa.DER) != len(sb.DER) {
			t.Fatalf("%s: A serves CRL set %d (%q), B %d (%q); want one", when, sa.Number, sa.Covers, sb.Number, sb.Covers)
		}
		for i := range sa.DER {
			if string(sa.DER[i]) != string(sb.DER[i]) {
				t.Fatalf("%s: CRL %d differs between A and B", when, i)
			}
		}
		if va, vb := a.newestBundle(), b.newestBundle(); va != vb || va == "" {
			t.Fatalf("%s: bundle versions A %q, B %q; want one", when, va, vb)
		}
	}
	syncBoth := func() {
		t.Helper()
		for _, s := range []*Server{a, b} {
			if err := s.synced(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	e, err := a.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/a/sa/web", Selectors: []store.Selector{{Type: "unix", Value: "uid:4242"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	mint := func() (string, *big.Int) {
		t.Helper()
		svid, err := b.MintX509SVID(ctx, MintRequest{SpiffeID: e.SpiffeID, KeyType: "ec-p256", EntryID: e.ID, Requester: "test"})
		if err != nil {
			t.Fatal(err)
		}
		n, _ := new(big.Int).SetString(svid.Serial, 16)
		return svid.Serial, n
	}
	syncBoth()
	same("B started beside the leader")

	// Revoked through the follower: the leader signs, both serve its set.
	serial1, n1 := mint()
	if _, err := b.Revoke(ctx, "", serial1, "test"); err != nil {
		t.Fatal(err)
	}
	syncBoth()
	if _, listed := servedCRLState(t, b, n1); !listed {
		t.Fatal("the follower's CRLs do not list the serial revoked through it")
	}
	same("after a revocation through the follower")
	stored, err := bs.GetCRLs(ctx)
	if err != nil || stored.Number != servedSet(a).Number {
		t.Fatalf("stored set %d, %v; want the leader's %d", stored.Number, err, servedSet(a).Number)
	}

	// A leader that cannot store: the follower waits, then signs its own.
	aStore.fail.Store(true)
	serial2, n2 := mint()
	if _, err := a.Revoke(ctx, "", serial2, "test"); err != nil {
		t.Fatal(err)
	}
	syncBoth()
	if _, listed := servedCRLState(t, a, n2); !listed {
		t.Fatal("the leader's CRLs do not list the serial it revoked")
	}
	if _, listed := servedCRLState(t, b, n2); listed {
		t.Fatal("the follower signed its own CRLs at once instead of waiting for the leader's")
	}
	fc.Advance(crlLeaderGrace)
	if _, listed := servedCRLState(t, b, n2); !listed {
		t.Fatalf("the follower's CRLs do not list the revoked serial %s after waiting %s for a leader that cannot store", serial2, crlLeaderGrace)
	}

	// The leader goes: B leads and stores the set it serves.
	aStore.fail.Store(false)
	rev, err := bs.Revision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w, err := bs.Watch(ctx, rev)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	aClosed = true
	want := servedSet(b)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for stored.Number != want.Number {
		select {
		case r, ok := <-w.Responses():
			if !ok {
				t.Fatalf("watch ended: %v", w.Err())
			}
			for _, ev := range r.Events {
				if ev.Kind == store.KindCRLs {
					stored = *ev.CRLs
				}
			}
		case <-wctx.Done():
			t.Fatalf("the new leader did not store its CRL set %d (stored: %d)", want.Number, stored.Number)
		}
	}
	if stored, err = bs.GetCRLs(ctx); err != nil || stored.Number != want.Number || stored.Covers != want.Covers || !b.Leading() {
		t.Fatalf("stored covers %q, B leading %v; want B's %q", stored.Covers, b.Leading(), want.Covers)
	}
}

// crlPair is a leader A (whose PutCRLs can be made to fail) and a
// follower B on one bbolt store and one fake clock, and an entry to mint
// for.
type crlPair struct {
	t      *testing.T
	fc     *fakeclock.Clock
	bs     store.Store
	kek    string
	aStore *crlFaultStore
	bStore *crlFaultStore
	a, b   *Server
	e      store.Entry
}

func newCRLPair(t *testing.T) *crlPair {
	t.Helper()
	bs, kekFile := sharedBolt(t)
	p := &crlPair{t: t, fc: fakeclock.New(time.Now()), bs: bs, kek: kekFile,
		aStore: &crlFaultStore{sharedStore: sharedStore{bs}}, bStore: &crlFaultStore{sharedStore: sharedStore{bs}}}
	p.a = openClockedReplica(t, p.aStore, kekFile, p.fc)
	t.Cleanup(func() { p.a.Close() })
	p.b = openClockedReplica(t, p.bStore, kekFile, p.fc)
	t.Cleanup(func() { p.b.Close() })
	var err error
	p.e, err = p.a.CreateEntry(context.Background(), EntrySpec{SpiffeID: "spiffe://cluster.local/ns/a/sa/web",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:4242"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	p.sync()
	return p
}

func (p *crlPair) sync(more ...*Server) {
	p.t.Helper()
	for _, s := range append([]*Server{p.a, p.b}, more...) {
		if err := s.synced(context.Background()); err != nil {
			p.t.Fatal(err)
		}
	}
}

func (p *crlPair) mint() (string, *big.Int) {
	p.t.Helper()
	svid, err := p.a.MintX509SVID(context.Background(), MintRequest{SpiffeID: p.e.SpiffeID, KeyType: "ec-p256", EntryID: p.e.ID, Requester: "test"})
	if err != nil {
		p.t.Fatal(err)
	}
	n, _ := new(big.Int).SetString(svid.Serial, 16)
	return svid.Serial, n
}

func (p *crlPair) revoke(serial string) {
	p.t.Helper()
	if _, err := p.a.Revoke(context.Background(), "", serial, "test"); err != nil {
		p.t.Fatal(err)
	}
	p.sync()
}

// TestCRLSetMatchesWhateverTheRevocationOrder: serials revoked out of
// order are listed in commit order by a replica that watched them, and in
// key order by one that loaded them at start-up; a replica started after
// them still serves the leader's set. (Its view used to compare unequal,
// so it signed its own and waited out the grace at every change.)
func TestCRLSetMatchesWhateverTheRevocationOrder(t *testing.T) {
	p := newCRLPair(t)
	var serials []*big.Int
	var hexes []string
	for range 4 {
		h, n := p.mint()
		serials, hexes = append(serials, n), append(hexes, h)
	}
	slices.SortFunc(hexes, func(x, y string) int { return -strings.Compare(x, y) })
	for _, h := range hexes {
		p.revoke(h)
	}
	c := openClockedReplica(t, sharedStore{p.bs}, p.kek, p.fc)
	defer c.Close()
	p.sync(c)
	if sa, sc := servedSet(p.a), servedSet(c); sa.Number != sc.Number {
		t.Fatalf("a replica started after out-of-order revocations serves set %d, the leader %d: it signed its own", sc.Number, sa.Number)
	}
	for _, n := range serials {
		if _, listed := servedCRLState(t, c, n); !listed {
			t.Fatalf("serial %x not on the new replica's CRLs", n)
		}
	}
}

// TestFollowerWaitIsBounded: while the leader cannot store its set,
// revocations keep coming every 0.6 s; the follower lists the first one
// crlLeaderGrace after it, not later (its wait used to start again at
// every change). An unrelated maintenance tick re-arming the timer in
// between does not lose the wait's deadline.
func TestFollowerWaitIsBounded(t *testing.T) {
	p := newCRLPair(t)
	p.aStore.fail.Store(true)
	first, firstN := p.mint()
	second, _ := p.mint()
	p.revoke(first)
	if _, listed := servedCRLState(t, p.b, firstN); listed {
		t.Fatal("the follower signed its own CRLs at once instead of waiting for the leader's")
	}
	p.b.armMaintenance()
	p.fc.Advance(600 * time.Millisecond)
	p.revoke(second)
	if _, listed := servedCRLState(t, p.b, firstN); listed {
		t.Fatal("the follower stopped waiting before crlLeaderGrace")
	}
	followerSigned := metricValue(p.b.metrics.CRLSetsSigned.WithLabelValues("follower"))
	p.fc.Advance(600 * time.Millisecond)
	if _, listed := servedCRLState(t, p.b, firstN); !listed {
		t.Fatalf("1.2 s after a revocation, under more revocations, the follower's CRLs still do not list it (grace %s)", crlLeaderGrace)
	}
	if got := metricValue(p.b.metrics.CRLSetsSigned.WithLabelValues("follower")); got != followerSigned+1 {
		t.Fatalf("meshid_crl_sets_signed_total{role=follower} %v after the follower signed its own, was %v", got, followerSigned)
	}
	if got := metricValue(p.a.metrics.CRLStoreFailures); got < 1 {
		t.Fatalf("meshid_crl_store_failures_total on the leader = %v after failed writes", got)
	}
	// The store works again: the leader's next attempt (after its
	// backoff) signs anew, above the follower's own, and both serve it.
	p.aStore.fail.Store(false)
	p.fc.Advance(2 * time.Second)
	p.sync()
	if sa, sb := servedSet(p.a), servedSet(p.b); sa.Number != sb.Number || p.a.newestBundle() != p.b.newestBundle() {
		t.Fatalf("after the leader's store came back: A serves set %d, B %d; want one", sa.Number, sb.Number)
	}
	if na, nb := metricValue(p.a.metrics.CRLNumber), metricValue(p.b.metrics.CRLNumber); na != nb || na != float64(servedSet(p.a).Number) {
		t.Fatalf("meshid_crl_number: A %v, B %v; want both %d", na, nb, servedSet(p.a).Number)
	}
}

// TestFollowerDoesNotWaitForANewCA: a CA new to a follower's bundle gets
// a CRL from the follower at once, without the leader's set: Envoy
// refuses every chain through a CA it has no CRL for.
func TestFollowerDoesNotWaitForANewCA(t *testing.T) {
	p := newCRLPair(t)
	p.aStore.fail.Store(true)
	if _, err := p.a.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	p.sync()
	if n := len(p.b.BundleCerts()); n != 2 {
		t.Fatalf("the follower's bundle has %d CAs after a prepare, want 2", n)
	}
	if got := servedSet(p.b); len(got.DER) != 2 {
		t.Fatalf("the follower serves %d CRLs for 2 CAs", len(got.DER))
	}
}

// TestReplicaRefusesAStaleCRLSet: a set in the store whose Covers claims
// a revocation its CRLs do not list (an older set replayed by a bug or by
// whoever holds etcd credentials) is not served: a replica reads what the
// CRLs cover from the CRLs, and signs its own.
func TestReplicaRefusesAStaleCRLSet(t *testing.T) {
	p := newCRLPair(t)
	ctx := context.Background()
	old, err := p.bs.GetCRLs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	serial, n := p.mint()
	p.revoke(serial)
	cur, err := p.bs.GetCRLs(ctx)
	if err != nil || cur.Number == old.Number {
		t.Fatalf("stored set %d after the revocation (%v); want a new one after %d", cur.Number, err, old.Number)
	}
	// The leader can no longer repair the store; the replay goes in.
	p.aStore.fail.Store(true)
	forged := old
	forged.Covers, forged.RefreshAt = cur.Covers, cur.RefreshAt
	if err := p.bs.PutCRLs(ctx, forged); err != nil {
		t.Fatal(err)
	}
	c := openClockedReplica(t, sharedStore{p.bs}, p.kek, p.fc)
	defer c.Close()
	p.sync(c)
	if got := servedSet(c); got.Number == old.Number {
		t.Fatal("a new replica serves the replayed set")
	}
	if _, listed := servedCRLState(t, c, n); !listed {
		t.Fatal("a new replica's CRLs do not list the revoked serial")
	}
}

// same fails unless A and B serve one CRL set and bundle version.
func (p *crlPair) same(when string) {
	p.t.Helper()
	if sa, sb := servedSet(p.a), servedSet(p.b); sa.Number != sb.Number || p.a.newestBundle() != p.b.newestBundle() {
		p.t.Fatalf("%s: A serves CRL set %d, B %d; want one", when, sa.Number, sb.Number)
	}
}

// TestFollowerTakesALateLeaderSet: the leader's write takes longer than
// the follower's grace, so the follower signs its own, numbered above the
// leader's; when the leader's set lands the follower serves it anyway
// (it used to keep its own until the next change, up to 12 h).
func TestFollowerTakesALateLeaderSet(t *testing.T) {
	p := newCRLPair(t)
	serial, n := p.mint()
	p.aStore.entered, p.aStore.gate = make(chan struct{}, 1), make(chan struct{})
	revoked := make(chan error, 1)
	go func() { _, err := p.a.Revoke(context.Background(), "", serial, "test"); revoked <- err }()
	<-p.aStore.entered // the leader signed and is writing
	if err := p.b.synced(context.Background()); err != nil {
		t.Fatal(err)
	}
	p.fc.Advance(crlLeaderGrace)
	own := servedSet(p.b)
	if _, listed := servedCRLState(t, p.b, n); !listed {
		t.Fatal("the follower's own CRLs do not list the serial")
	}
	close(p.aStore.gate)
	if err := <-revoked; err != nil {
		t.Fatal(err)
	}
	p.sync()
	if servedSet(p.a).Number >= own.Number {
		t.Fatalf("set-up: the leader's set %d is not below the follower's own %d", servedSet(p.a).Number, own.Number)
	}
	p.same("after the late leader's set landed")
}

// TestFollowerReadsTheStoredSetAgain: a failed read of the leader's set
// (the watch said it changed) is retried from the maintenance tick, before
// the follower's wait ends and it would sign its own.
func TestFollowerReadsTheStoredSetAgain(t *testing.T) {
	p := newCRLPair(t)
	serial, _ := p.mint()
	p.bStore.getFails.Store(1)
	p.revoke(serial)
	if servedSet(p.a).Number == servedSet(p.b).Number {
		t.Fatal("set-up: the follower has the leader's set although its read failed")
	}
	p.fc.Advance(crlLeaderGrace)
	p.same("after the follower read the stored set again")
	if got := metricValue(p.b.metrics.CRLSetsSigned.WithLabelValues("follower")); got != 0 {
		t.Fatalf("the follower signed %v set(s) of its own; want it to have read the leader's", got)
	}
}

// TestNoTimerLoopAfterLosingTheLead: a leader whose write failed, then
// lost the leadership, does not keep its retry: its maintenance timer is
// next armed in the future, not at the past retry time (which fired it
// again at once, in a loop burning a core).
func TestNoTimerLoopAfterLosingTheLead(t *testing.T) {
	p := newCRLPair(t)
	p.aStore.fail.Store(true)
	serial, _ := p.mint()
	p.revoke(serial)
	p.a.leader.set(false)
	p.fc.Advance(1500 * time.Millisecond)
	p.a.pubMu.Lock()
	armed := p.a.maint.armedFor
	p.a.pubMu.Unlock()
	if !armed.After(p.fc.Now()) {
		t.Fatalf("maintenance timer armed for %s, not after now %s: it fires again at once", armed, p.fc.Now())
	}
}

// TestCheckStoredRefuses: a stored set is not served if a CRL is signed by
// a key outside the bundle, carries another number than the set, or is
// within crlStaleMargin of its nextUpdate.
func TestCheckStoredRefuses(t *testing.T) {
	p := newCRLPair(t)
	s := p.a
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	now := s.now()
	s.mu.RLock()
	var jobs []crlJob
	for _, v := range s.cas {
		if v.inBundle(now) && v.auth != nil {
			jobs = append(jobs, crlJob{v: v})
		}
	}
	s.mu.RUnlock()
	if len(jobs) != 1 {
		t.Fatalf("set-up: %d CAs in the bundle, want 1", len(jobs))
	}
	v := jobs[0].v
	good := *s.crl.served
	if c := s.checkStored(&good, jobs); !c.ok {
		t.Fatal("the leader's own set does not check")
	}
	sign := func(key crypto.Signer, number int64, next time.Time) store.SignedCRLs {
		der, err := ca.SignCRL(v.cert, key, nil, number, now, next)
		if err != nil {
			t.Fatal(err)
		}
		return store.SignedCRLs{Covers: good.Covers, Number: number, SignedAt: now, RefreshAt: now.Add(time.Hour), DER: [][]byte{der}}
	}
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	foreign := sign(other, good.Number+1, now.Add(24*time.Hour))
	if c := s.checkStored(&foreign, jobs); c.ok {
		t.Fatal("a CRL signed by a key outside the bundle checks")
	}
	renumbered := sign(v.auth.Key, good.Number+1, now.Add(24*time.Hour))
	renumbered.Number++
	if c := s.checkStored(&renumbered, jobs); c.ok {
		t.Fatal("a CRL whose number is not the set's checks")
	}
	soon := sign(v.auth.Key, good.Number+2, now.Add(30*time.Second))
	if c := s.checkStored(&soon, jobs); !c.ok || now.Before(c.refresh) {
		t.Fatalf("a CRL 30 s from its nextUpdate: ok %v, refresh %s; want it due now (%s)", c.ok, c.refresh, now)
	}
}

// TestAdoptedSetKeepsItsCheckedCover: a stored set whose Covers claims a
// revocation its CRLs do not list yet (forged to match a view to come)
// is served for the view its CRLs do list; when that revocation comes,
// the replica does not take the forged claim for its CRLs: it lists the
// serial once its wait for the leader ends.
func TestAdoptedSetKeepsItsCheckedCover(t *testing.T) {
	p := newCRLPair(t)
	ctx := context.Background()
	serial, n := p.mint()
	cur, err := p.bs.GetCRLs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p.aStore.fail.Store(true) // the leader cannot repair the store
	forged := cur
	forged.Covers = strings.TrimSuffix(cur.Covers, ";") + "," + n.Text(16) + ";"
	if err := p.bs.PutCRLs(ctx, forged); err != nil {
		t.Fatal(err)
	}
	c := openClockedReplica(t, sharedStore{p.bs}, p.kek, p.fc)
	defer c.Close()
	p.sync(c)
	if got := servedSet(c); got.Number != cur.Number || got.Covers != cur.Covers {
		t.Fatalf("set-up: the new replica serves set %d covering %q; want the stored %d as its CRLs cover it, %q", got.Number, got.Covers, cur.Number, cur.Covers)
	}
	p.revoke(serial)
	if err := c.synced(ctx); err != nil {
		t.Fatal(err)
	}
	p.fc.Advance(crlLeaderGrace)
	if _, listed := servedCRLState(t, c, n); !listed {
		t.Fatal("the revoked serial is not on the CRLs: the replica took the stored set's claim for what its CRLs list")
	}
}
