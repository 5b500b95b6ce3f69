package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestServerRefusesHijackableSocketDir: a socket directory another user
// owns makes the server exit 1 with one line naming it.
func TestServerRefusesHijackableSocketDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a directory to another uid")
	}
	sd := filepath.Dir(sockDir(t)) // sockDir names a directory still to be made
	evil := filepath.Join(sd, "meshid")
	if err := os.Mkdir(evil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(evil, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	p := startMeshid(t, "server", "--data-dir", t.TempDir(),
		"--admin-socket", filepath.Join(evil, "admin", "admin.sock"), "--socket", filepath.Join(sd, "w", "workload.sock"))
	if code := p.wait(t); code != 1 {
		t.Fatalf("server on a directory owned by uid 65534: exit %d, want 1:\n%s", code, p.output())
	}
	var reason string
	for _, l := range strings.Split(p.output(), "\n") {
		if strings.HasPrefix(l, "meshid: ") {
			reason = l
		}
	}
	if !strings.Contains(reason, evil+" is owned by uid 65534") {
		t.Fatalf("exit reason %q does not name %s and its owner:\n%s", reason, evil, p.output())
	}
	if _, err := os.Lstat(filepath.Join(evil, "admin")); err == nil {
		t.Fatal("the server created a directory inside the other user's directory")
	}
}
