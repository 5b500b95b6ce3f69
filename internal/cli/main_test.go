package cli

import (
	"testing"

	"go.uber.org/goleak"
)

// The commands start servers, agents and clients; none may outlive its
// command.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
