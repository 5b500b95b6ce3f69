package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
)

// spiffeEndpointSocketEnv is the go-spiffe convention for where the
// Workload API listens, e.g. "unix:///run/meshid/workload/workload.sock".
const spiffeEndpointSocketEnv = "SPIFFE_ENDPOINT_SOCKET"

// applySpiffeEndpointSocket fills the workload-side flag name (--socket)
// from SPIFFE_ENDPOINT_SOCKET when neither the command line nor
// MESHID_SOCKET set it: flag > MESHID_SOCKET > SPIFFE_ENDPOINT_SOCKET >
// default. It runs after applyEnv, which marks the flags it sets as
// changed.
func applySpiffeEndpointSocket(fs *pflag.FlagSet, name string) error {
	f := fs.Lookup(name)
	if f == nil || f.Changed {
		return nil
	}
	v, ok := os.LookupEnv(spiffeEndpointSocketEnv)
	if !ok || v == "" {
		return nil
	}
	p, err := socketPathFromAddr(v)
	if err != nil {
		return fmt.Errorf("%s=%q: %w", spiffeEndpointSocketEnv, v, err)
	}
	return fs.Set(name, p)
}

// socketPathFromAddr turns a Workload API address (unix:///abs/path,
// unix:path) or a plain path into a path.
func socketPathFromAddr(addr string) (string, error) {
	switch {
	case strings.HasPrefix(addr, "unix://"):
		p := strings.TrimPrefix(addr, "unix://")
		if !strings.HasPrefix(p, "/") {
			return "", fmt.Errorf("want unix:///absolute/path (three slashes)")
		}
		return p, nil
	case strings.HasPrefix(addr, "unix:"):
		return strings.TrimPrefix(addr, "unix:"), nil
	case strings.Contains(addr, "://"):
		return "", fmt.Errorf("meshid serves the Workload API on a unix socket; want unix:///path")
	default:
		return addr, nil
	}
}
