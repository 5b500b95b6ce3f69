package etcdstore

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/storetest"
)

// TestMain checks, once every test has closed its stores and the shared
// cluster is down, that no goroutine of the package (watchers, the group
// commit, health and compaction loops, leadership monitors, the etcd
// client's) is left.
func TestMain(m *testing.M) {
	code := etcdtest.Main(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines left after the tests:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// openShared opens a store on a fresh prefix of the shared cluster.
func openShared(t *testing.T, o Options) *Store {
	t.Helper()
	eps, prefix := etcdtest.Shared(t)
	o.Endpoints, o.Prefix = eps, prefix
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 2 * time.Second
	}
	s, err := Open(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return openShared(t, Options{}) })
}

var _ storetest.Compacter = (*Store)(nil)

// TestMigratorConformance: an etcd store round-trips every kind through
// Export and Import as boltstore does, so store migrate works both ways.
func TestMigratorConformance(t *testing.T) {
	storetest.RunMigrator(t, func(t *testing.T) store.Store { return openShared(t, Options{}) })
}
