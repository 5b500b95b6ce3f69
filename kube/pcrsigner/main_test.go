package pcrsigner_test

import (
	"os"
	"testing"

	"github.com/meshid/meshid/internal/k8stest"
)

// TestMain checks that Run stops everything it started.
func TestMain(m *testing.M) { os.Exit(k8stest.Main(m)) }
