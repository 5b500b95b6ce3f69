package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshid/meshid/internal/etcdtest"
)

// TestStoreMigrateToEtcdAndBack: a bolt data dir written by a real server
// is migrated to etcd (TLS with a client certificate, a prefix of its own);
// a server on --store etcd with the source's KEK serves the same bundle,
// entries and inventory; the rollback to a new bolt dir serves them too.
// A second migration into the now non-empty prefix is refused.
func TestStoreMigrateToEtcdAndBack(t *testing.T) {
	c := etcdtest.Start(t, 1, etcdtest.Options{TLS: true})
	pki := c.PKI()
	base, err := os.MkdirTemp("", "mstore-") // short: socket paths are at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	sock := func(name string) string {
		d := filepath.Join(base, "run-"+name)
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		return d
	}
	dirA, dirC := filepath.Join(base, "a"), filepath.Join(base, "c")
	srv := startCLIServer(t, dirA, sock("a"))
	admin := "--admin-socket=" + srv.admin
	for _, args := range [][]string{
		{"entry", "create", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/web", "--selector", "unix:uid:1000"},
		{"x509", "mint", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/batch", "--out-dir", filepath.Join(base, "mint1")},
		{"ca", "prepare"},
	} {
		if _, errOut, code := run(t, append(args, admin)...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
	}
	want := srv.served(t)
	srv.stop()

	etcd := "etcd:" + strings.Join(c.Endpoints(), ",")
	tlsFlags := []string{"--etcd-ca", pki.CAFile, "--etcd-cert", pki.ClientCert, "--etcd-key", pki.ClientKey, "--etcd-prefix", "/plane-a/"}
	out, errOut, code := run(t, append([]string{"store", "migrate", "--from", "bolt:" + dirA, "--to", etcd}, tlsFlags...)...)
	if code != 0 || !strings.Contains(out, "identical on both sides") {
		t.Fatalf("migrate bolt -> etcd: exit %d: %s\n%s", code, errOut, out)
	}
	_, errOut, code = run(t, append([]string{"store", "migrate", "--from", "bolt:" + dirA, "--to", etcd}, tlsFlags...)...)
	if code != 1 || !strings.Contains(errOut, "not empty") {
		t.Fatalf("second migrate into the same prefix: exit %d: %s", code, errOut)
	}

	kek := "--kek-file=" + filepath.Join(dirA, "kek")
	srvArgs := append([]string{kek, "--store", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ",")}, tlsFlags...)
	es := startCLIServer(t, filepath.Join(base, "e"), sock("e"), srvArgs...)
	got := es.served(t)
	es.stop()
	if got != want {
		t.Fatalf("server on etcd serves\n%+v\nthe bolt original served\n%+v", got, want)
	}

	out, errOut, code = run(t, append([]string{"store", "migrate", "--from", etcd, "--to", "bolt:" + dirC}, tlsFlags...)...)
	if code != 0 || !strings.Contains(out, "identical on both sides") {
		t.Fatalf("migrate etcd -> bolt: exit %d: %s\n%s", code, errOut, out)
	}
	back := startCLIServer(t, dirC, sock("c"), kek)
	got = back.served(t)
	back.stop()
	if got != want {
		t.Fatalf("server on the rolled-back dir serves\n%+v\nthe original served\n%+v", got, want)
	}
}
