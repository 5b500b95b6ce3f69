package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// `meshid entry create` and `entry update` with a selector kind that no
// attestor of the server produces exit 1 with one line naming the
// attestor that would produce it, and leave the entries as they were.
func TestEntryWithKubernetesSelectorRefused(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	srv := startMeshid(t, "server", "--data-dir", t.TempDir(), "--admin-socket", sock, "--socket", filepath.Join(filepath.Dir(sock), "w.sock"))
	srv.waitFor(t, "msg=serving")
	admin := "--admin-socket=" + sock
	out, errOut, code := runCLI(t, "entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/web", "--selector", "unix:uid:1000", "-o", "json")
	var created struct{ ID string }
	if err := json.Unmarshal([]byte(out), &created); code != 0 || err != nil || created.ID == "" {
		t.Fatalf("entry create: %v %s", err, errOut)
	}
	before, _, code := runCLI(t, "entry", "list", admin, "-o", "json")
	if code != 0 {
		t.Fatal("entry list failed")
	}
	for _, args := range [][]string{
		{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "k8s:ns:shop"},
		{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "unix:uid:1000", "--selector", "k8s:sa:db"},
		{"entry", "update", admin, created.ID, "--selector", "k8s:ns:shop"},
	} {
		stdout, stderr, code := runCLI(t, args...)
		oneLineError(t, args, stdout, stderr, code)
		if !strings.Contains(stderr, "is produced by the k8s workload attestor, which this server does not run") {
			t.Errorf("%v: stderr %q does not name the attestor", args, stderr)
		}
	}
	after, _, code := runCLI(t, "entry", "list", admin, "-o", "json")
	if code != 0 || after != before {
		t.Fatalf("entries changed by refused commands:\nbefore %s\nafter  %s", before, after)
	}
}
