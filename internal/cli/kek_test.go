package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/meshid/kek"
)

// Replicas share one KEK, so operators make it with meshid kek create; it
// must never replace an existing key (everything sealed under it would be
// lost) and must be private.
func TestKEKCreate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kek")
	if _, stderr, code := run(t, "kek", "create", path); code != 0 {
		t.Fatalf("kek create: exit %d: %s", code, stderr)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
	before, _ := os.ReadFile(path)
	if _, err := kek.Load(path); err != nil {
		t.Fatalf("the made key does not load: %v", err)
	}
	_, stderr, code := run(t, "kek", "create", path)
	if code != 1 || !strings.Contains(stderr, "already exists") {
		t.Fatalf("second create: exit %d, stderr %q; want 1 and 'already exists'", code, stderr)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Fatal("the existing key was changed")
	}
}

// With --store etcd a replica must be given the shared KEK: it never makes
// its own (another replica could not open the CA keys it sealed).
func TestServerEtcdNeedsKEKFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"}, "--kek-file"},
		{[]string{"--store", "etcd"}, "--etcd-endpoints"},
		{[]string{"--store", "etcd", "--etcd-endpoints", "ftp://x"}, "not an etcd client URL"},
		{[]string{"--store", "etcd", "--etcd-endpoints", "http://a:1,https://b:2"}, "mix of http and https"},
		{[]string{"--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1", "--etcd-prefix", "meshid"}, "--etcd-prefix"},
		{[]string{"--store", "bolt", "--etcd-endpoints", "http://127.0.0.1:1"}, "need --store etcd"},
		{[]string{"--store", "sqlite"}, "want bolt or etcd"},
	} {
		args := append([]string{"server", "--data-dir", dir, "--admin-socket", filepath.Join(dir, "a.sock"), "--socket", filepath.Join(dir, "w.sock")}, tc.args...)
		_, stderr, code := run(t, args...)
		if code != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 1 and %q", tc.args, code, stderr, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "kek")); err == nil {
		t.Fatal("a KEK was made in the data dir")
	}
}
