package cli

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestAgentServerList: --server takes the replicas separated by commas;
// an empty or malformed item is refused before the agent starts (exit 1,
// one line naming it), and --help says how the list is used.
func TestAgentServerList(t *testing.T) {
	dir := t.TempDir()
	// --availability-target 0s is refused after --server is read: a list
	// that passes reaches it, so a good list is seen to be accepted and
	// a bad one is seen to be refused for itself.
	args := func(server string) []string {
		return []string{"agent", "--server", server, "--insecure-bootstrap", "--join-token", "mat_x", "--availability-target", "0s",
			"--data-dir", filepath.Join(dir, "data"), "--socket", filepath.Join(dir, "w.sock")}
	}
	for _, tc := range []struct{ server, want string }{
		{"127.0.0.1:8443,,127.0.0.1:8444", `--server: server list "127.0.0.1:8443,,127.0.0.1:8444": item 2 is empty`},
		{"127.0.0.1:8443,", "item 2 is empty"},
		{"127.0.0.1:8443,garbage", `server "garbage" is not host:port`},
		{"r1:8443,:8444", `server ":8444": no valid host`},
		{"r1:8443,r2:http", `port "http" is not a number`},
		{"r1:8443,r2:70000", `port "70000" is not a number from 1 to 65535`},
		{"r1:8443, r1:8443", "names r1:8443 twice"},
		{"dns:///r1:8443,r2:8443", `server "dns:///r1:8443" is not host:port`},
		{"a/b:8443,r2:8443", `server "a/b:8443": no valid host`},
		{" ", "server address is required"},
	} {
		_, errOut, code := run(t, args(tc.server)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("--server %q: exit %d, stderr %q; want exit 1 and one line with %q", tc.server, code, errOut, tc.want)
		}
	}
	for _, good := range []string{"127.0.0.1:8443", "r1:8443,r2:8443,r3:8443", " r1:8443 , [::1]:8444 "} {
		_, errOut, code := run(t, args(good)...)
		if code != 1 || !strings.Contains(errOut, "--availability-target 0s: must be positive") {
			t.Errorf("--server %q: exit %d, stderr %q; want the list accepted (the next check refusing)", good, code, errOut)
		}
	}
	out, _, code := run(t, "agent", "--help")
	if code != 0 || !strings.Contains(out, "HOST:PORT[,HOST:PORT...]") || !strings.Contains(out, "r1:8443,r2:8443,r3:8443") ||
		!strings.Contains(out, "meshid_agent_server_failovers_total") {
		t.Fatalf("agent --help does not explain the replica list:\n%s", out)
	}
}
