package bench_test

import (
	"testing"

	"go.uber.org/goleak"
)

// The load generators start a goroutine per stream and per client; every
// one must be gone when a run returns, or a long `meshid bench` would
// accumulate them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
