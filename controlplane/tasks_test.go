package controlplane

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// gateStore holds the first prepared X.509 CA's PutCA until gate is
// closed, and notes whether the store was closed under a write in flight.
type gateStore struct {
	store.Store
	gate, entered chan struct{}
	once          sync.Once
	inFlight      atomic.Int32
	closedUnder   atomic.Bool
}

func (g *gateStore) PutCA(ctx context.Context, rec store.CARecord, ev *store.AuditEvent) error {
	g.inFlight.Add(1)
	defer g.inFlight.Add(-1)
	if rec.Kind == "x509" && rec.State == store.CAPrepared {
		g.once.Do(func() { close(g.entered) })
		<-g.gate
	}
	return g.Store.PutCA(ctx, rec, ev)
}

func (g *gateStore) Close() error {
	if g.inFlight.Load() > 0 {
		g.closedUnder.Store(true)
	}
	return g.Store.Close()
}

// TestCloseWaitsForLifecycleStep: Close cancels a lifecycle step in flight
// (here, the automatic prepare, held inside its store write) and waits for
// it before it closes the store, instead of closing the store under it.
func TestCloseWaitsForLifecycleStep(t *testing.T) {
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	g := &gateStore{Store: bs, gate: make(chan struct{}), entered: make(chan struct{})}
	clk := fakeclock.New(time.Now())
	srv, err := Open(context.Background(), Config{DataDir: dir, Store: g, Now: clk.Now, AfterFunc: clk.AfterFunc,
		SVIDTTL: time.Hour, CATTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	advanced := make(chan struct{})
	go func() {
		defer close(advanced)
		clk.Advance(25 * time.Hour) // past prepare-at: half of the CA's life
	}()
	select {
	case <-g.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the automatic prepare never wrote its CA")
	}
	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	// Close must not return, nor close the store, while the step is held;
	// a short look (this can only miss a bug, not invent one).
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a lifecycle step was in flight", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(g.gate)
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return after the step finished")
	}
	<-advanced
	if g.closedUnder.Load() {
		t.Fatal("the store was closed under a lifecycle write in flight")
	}
}
