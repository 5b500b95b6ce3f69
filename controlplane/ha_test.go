package controlplane

import (
	"context"
	"testing"
	"time"

	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/store"
)

func countActive(t *testing.T, st store.Store) (x509, jwt int, newest string) {
	t.Helper()
	recs, err := st.ListCAs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.State != store.CAActive {
			continue
		}
		switch r.Kind {
		case "x509":
			x509++
			newest = r.ID
		case "jwt":
			jwt++
		}
	}
	return x509, jwt, newest
}

// TestReplicasStartTogetherOnEmptyStore: replicas started at once on an
// empty store make one CA between them, and every one of them starts. The
// first to lead makes it; the others used to wait in the campaign for a
// leadership the winner keeps for as long as it runs, so they never
// started.
func TestReplicasStartTogetherOnEmptyStore(t *testing.T) {
	bs, kekFile := sharedBolt(t)
	if _, err := kek.Create(kekFile); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	type opened struct {
		srv *Server
		err error
	}
	res := make(chan opened, 3)
	for range 3 {
		go func() {
			srv, err := Open(ctx, Config{DataDir: t.TempDir(), Store: sharedStore{bs}, KEKFile: kekFile, SharedKEK: true,
				SVIDTTL: time.Hour, CATTL: 48 * time.Hour})
			res <- opened{srv, err}
		}()
	}
	leaders := 0
	for range 3 {
		o := <-res
		if o.err != nil {
			t.Errorf("a replica did not start: %v", o.err)
			continue
		}
		defer o.srv.Close()
		if o.srv.requireLeader(ctx) == nil {
			leaders++
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if x, j, _ := countActive(t, bs); x != 1 || j != 1 {
		t.Fatalf("%d active X.509 CAs and %d JWT keys after three replicas started; want 1 and 1", x, j)
	}
}

// TestTakeoverFinishesInterruptedActivation: a leader that dies between
// the two writes of an activation (successor active, old CA not yet
// retired) leaves two active CAs; the replica that takes over finishes the
// step at once, not only at its next restart.
func TestTakeoverFinishesInterruptedActivation(t *testing.T) {
	ctx := context.Background()
	bs, kekFile := sharedBolt(t)
	a := openReplica(t, bs, kekFile)
	aClosed := false
	defer func() {
		if !aClosed {
			a.Close()
		}
	}()
	b := openReplica(t, bs, kekFile)
	defer b.Close()
	if !a.Leading() || b.Leading() {
		t.Fatalf("leading: a %v, b %v; want a alone", a.Leading(), b.Leading())
	}
	a.rotMu.Lock()
	next, err := a.prepareLocked(ctx, "test")
	a.rotMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	// The crash: the successor's write landed, the old CA's did not.
	next.State = store.CAActive
	if err := bs.PutCA(ctx, next, nil); err != nil {
		t.Fatal(err)
	}
	if x, _, _ := countActive(t, bs); x != 2 {
		t.Fatalf("%d active CAs; the set-up wants 2", x)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	aClosed = true
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for b.requireLeader(wctx) != nil {
		if wctx.Err() != nil {
			t.Fatal("b did not take over")
		}
	}
	x, _, newest := countActive(t, bs)
	if x != 1 || newest != next.ID {
		t.Fatalf("after takeover: %d active CAs (newest %s); want only %s", x, newest, next.ID)
	}
}
