package controlplane

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// BenchmarkStartup100k: a server whose store holds 100,000 entries and
// 100,000 live inventory rows opens (store, CA, JWT key, entry index,
// per-CA expiry scan of the inventory) and is ready to serve.
func BenchmarkStartup100k(b *testing.B) {
	const n = 100_000
	dir := b.TempDir()
	srv, err := Open(context.Background(), Config{DataDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	caID := srv.activeID
	srv.Close()

	// Bulk-load without fsyncs: this is setup, not what is measured.
	st, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{UnsafeNoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	now := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 64 {
		wg.Go(func() {
			for i := w; i < n; i += 64 {
				e := store.Entry{ID: fmt.Sprintf("e-%07d", i), SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/n%d/sa/s%d", i%100, i),
					Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 100000+i)}}, CreatedAt: now}
				if err := st.CreateEntry(ctx, e, store.AuditEvent{Time: now, Actor: "bench", Action: "entry.create", Target: e.ID}); err != nil {
					errs <- err
					return
				}
				if err := st.RecordSVID(ctx, store.IssuedSVID{Serial: fmt.Sprintf("%032x", i+1), SpiffeID: e.SpiffeID, NotBefore: now,
					NotAfter: now.Add(24 * time.Hour), EntryID: e.ID, CAID: caID, IssuedAt: now}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	if err := st.Close(); err != nil {
		b.Fatal(err)
	}

	for b.Loop() {
		srv, err := Open(ctx, Config{DataDir: dir, DisableAutoRotate: true})
		if err != nil {
			b.Fatal(err)
		}
		if got := srv.entries.len(); got != n {
			b.Fatalf("%d entries loaded, want %d", got, n)
		}
		b.StopTimer()
		srv.Close()
		b.StartTimer()
	}
}
