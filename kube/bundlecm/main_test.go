package bundlecm_test

import (
	"os"
	"testing"

	"github.com/meshid/meshid/internal/k8stest"
)

// TestMain checks that Run stops everything it started: the informer and
// its watch, and the worker.
func TestMain(m *testing.M) { os.Exit(k8stest.Main(m)) }
