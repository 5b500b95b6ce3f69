package boltstore

import (
	"path/filepath"
	"testing"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/storetest"
)

// TestConformance runs the backend-neutral suite. The store skips fsync
// (durability has its own tests here) and keeps a short watch log, so that
// the slow-watcher test reaches compaction in a few dozen writes.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := Open(filepath.Join(t.TempDir(), "meshid.db"), Options{UnsafeNoSync: true, WatchRetain: 256})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

// TestMigratorConformance runs the backend-neutral Export/Import checks.
func TestMigratorConformance(t *testing.T) {
	storetest.RunMigrator(t, func(t *testing.T) store.Store {
		s, err := Open(filepath.Join(t.TempDir(), "meshid.db"), Options{UnsafeNoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

var _ storetest.Compacter = (*Store)(nil)
