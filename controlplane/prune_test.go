package controlplane

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func TestExpiredInventoryRowsArePrunedAfterRetention(t *testing.T) {
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	set := func(t time.Time) { mu.Lock(); clock = t; mu.Unlock() }
	t0 := now()
	ts := startServer(t, Config{Now: now, DisableAutoRotate: true, InventoryRetention: 24 * time.Hour})
	ctx := context.Background()
	short, err := ts.srv.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/short", TTL: time.Hour, Requester: "t"})
	if err != nil {
		t.Fatal(err)
	}
	long, err := ts.srv.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/long", TTL: 48 * time.Hour, Requester: "t"})
	if err != nil {
		t.Fatal(err)
	}
	serials := func() map[string]bool {
		rows, _, err := ts.srv.store.ListSVIDs(ctx, store.SVIDQuery{})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, r := range rows {
			out[r.Serial] = true
		}
		return out
	}
	// Expired, but within the retention: kept (listed with --include-expired).
	set(t0.Add(2 * time.Hour))
	ts.srv.pruneInventory(ctx)
	if got := serials(); !got[short.Serial] || !got[long.Serial] {
		t.Fatalf("pruned within the retention: %v", got)
	}
	// Past expiry + retention: gone; the live one stays.
	set(t0.Add(time.Hour + 24*time.Hour + time.Minute))
	ts.srv.pruneInventory(ctx)
	if got := serials(); got[short.Serial] || !got[long.Serial] {
		t.Fatalf("after the retention: %v (want only %s)", got, long.Serial)
	}
}
