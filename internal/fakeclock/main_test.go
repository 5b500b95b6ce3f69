package fakeclock

import (
	"testing"

	"go.uber.org/goleak"
)

// AfterFunc runs a timer that is due at once on its own goroutine: it must
// have finished by the end.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
