package cli

import (
	"path/filepath"
	"strings"
	"testing"
)

// The outage flags are checked before the agent starts: exit 1 with a
// one-line reason.
func TestAgentOutageFlags(t *testing.T) {
	dir := t.TempDir()
	base := []string{"agent", "--server", "127.0.0.1:1", "--insecure-bootstrap", "--join-token", "mat_x",
		"--data-dir", filepath.Join(dir, "data"), "--socket", filepath.Join(dir, "w.sock")}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--availability-target", "0s"}, "--availability-target 0s: must be positive"},
		{[]string{"--availability-target", "-1h"}, "must be positive"},
		{[]string{"--no-persist-cache", "--cache-key-file", filepath.Join(dir, "k")}, "not both"},
		{[]string{"--availability-target", "soon"}, "invalid argument"},
		{[]string{"--server-keepalive", "5s"}, "--server-keepalive 5s: must be at least 10s"},
		{[]string{"--server-keepalive", "-1s"}, "must be at least 10s"},
	} {
		_, errOut, code := run(t, append(append([]string{}, base...), tc.args...)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line with %q", tc.args, code, errOut, tc.want)
		}
	}
}
