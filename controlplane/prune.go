package controlplane

import (
	"context"
	"time"
)

// DefaultInventoryRetention is how long expired SVIDs stay listed in the
// inventory (with --include-expired) before they are pruned.
const DefaultInventoryRetention = 7 * 24 * time.Hour

// pruneInterval is how often expired inventory rows are pruned.
const pruneInterval = time.Hour

// pruneTick prunes the inventory and sweeps idle SVIDs every
// pruneInterval, on the injected clock, until Close.
func (s *Server) pruneTick(ctx context.Context) {
	// Replicas share the inventory: one pruner is enough.
	if s.Leading() {
		s.pruneInventory(ctx)
	}
	s.ids.SweepIdle(s.now())
	s.pruneTim.reset(pruneInterval)
}

// pruneInventory drops rows that expired more than the retention ago.
func (s *Server) pruneInventory(ctx context.Context) {
	cutoff := s.now().Add(-s.cfg.InventoryRetention)
	n, err := s.store.PruneSVIDs(ctx, cutoff)
	if err != nil {
		s.log.Error("prune inventory", "err", err)
		return
	}
	if n > 0 {
		s.log.Info("pruned expired SVIDs from the inventory", "rows", n, "expired_before", cutoff)
	}
}
