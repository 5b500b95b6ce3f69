package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// `meshid entry create` and `entry update` with a k8s selector no pod can
// have (a name Kubernetes refuses, a key the k8s attestor never produces)
// exit 1 with one line saying why, and leave the entries as they were;
// the k8s kinds themselves are accepted: the agents produce them.
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
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "k8s:ns:Shop"}, "is not a DNS-1123 label"},
		{[]string{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "unix:uid:1000", "--selector", "k8s:pod-owner:db"}, `unknown k8s selector key "pod-owner"`},
		{[]string{"entry", "update", admin, created.ID, "--selector", "k8s:sa:DB"}, "is not a DNS-1123 subdomain"},
	} {
		stdout, stderr, code := runCLI(t, tt.args...)
		oneLineError(t, tt.args, stdout, stderr, code)
		if !strings.Contains(stderr, tt.want) {
			t.Errorf("%v: stderr %q does not say %q", tt.args, stderr, tt.want)
		}
	}
	after, _, code := runCLI(t, "entry", "list", admin, "-o", "json")
	if code != 0 || after != before {
		t.Fatalf("entries changed by refused commands:\nbefore %s\nafter  %s", before, after)
	}
	if _, stderr, code := runCLI(t, "entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "k8s:ns:shop", "--selector", "k8s:sa:db"); code != 0 {
		t.Fatalf("entry with k8s:ns and k8s:sa refused: %s", stderr)
	}
}
