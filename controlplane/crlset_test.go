package controlplane

import (
	"context"
	"math/big"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// crlFaultStore is a shared store whose PutCRLs fails on demand: a leader
// that cannot write its set.
type crlFaultStore struct {
	sharedStore
	fail atomic.Bool
}

func (f *crlFaultStore) PutCRLs(ctx context.Context, c store.SignedCRLs) error {
	if f.fail.Load() {
		return store.ErrUnavailable
	}
	return f.sharedStore.PutCRLs(ctx, c)
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
	if stored.Covers != want.Covers || !b.Leading() {
		t.Fatalf("stored covers %q, B leading %v; want B's %q", stored.Covers, b.Leading(), want.Covers)
	}
}
