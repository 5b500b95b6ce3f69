package etcdstore

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m)) }

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
