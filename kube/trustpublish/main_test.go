package trustpublish_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/meshid/meshid/internal/k8stest"
)

// TestMain checks that Run stops everything it started: the informer and
// its watch, and the worker.
func TestMain(m *testing.M) {
	code := m.Run()
	k8stest.CloseIdle()
	if code == 0 {
		if err := k8stest.FindLeaks(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}
