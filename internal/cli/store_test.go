package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/store/migrate"
)

// cliServerRun is a `meshid server` run by Main on dataDir, as an operator
// runs it; stop ends it and waits.
type cliServerRun struct {
	admin string
	stop  func()
}

func startCLIServer(t *testing.T, dataDir, sockDir string, extra ...string) *cliServerRun {
	t.Helper()
	admin := filepath.Join(sockDir, "admin.sock")
	args := append([]string{"server", "--data-dir", dataDir, "--admin-socket", admin,
		"--socket", filepath.Join(sockDir, "workload.sock"), "--log-level", "warn"}, extra...)
	ctx, cancel := context.WithCancel(context.Background())
	var errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- Main(ctx, args, &bytes.Buffer{}, &errb) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("server on %s exited %d: %s", dataDir, code, errb.String())
		}
	}
	t.Cleanup(stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", admin); err == nil {
			c.Close()
			return &cliServerRun{admin: admin, stop: stop}
		}
		select {
		case code := <-done:
			stopped = true
			t.Fatalf("server on %s exited %d: %s", dataDir, code, errb.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server on %s did not listen", dataDir)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition with a deadline
	}
}

// served is what a server serves that a migration must carry over.
type served struct{ bundle, entries, certs string }

func (r *cliServerRun) served(t *testing.T) served {
	t.Helper()
	get := func(args ...string) string {
		out, errOut, code := run(t, append(args, "--admin-socket", r.admin)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	return served{
		bundle:  get("bundle", "show"),
		entries: get("entry", "list", "-o", "json"),
		certs:   get("certs", "list", "-o", "json"),
	}
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestStoreMigrate: a data dir written by a real server is migrated to a
// new dir and from there to a third (the rollback direction's machinery,
// bolt to bolt until etcd lands); servers started on the copies, with the
// source's KEK, serve the same bundle, entries and inventory. A running
// server's dir, a non-empty target and bad specs exit 1 with one line and
// change nothing.
func TestStoreMigrate(t *testing.T) {
	base, err := os.MkdirTemp("", "mstore-") // short: socket paths are at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	dirA, dirB, dirC := filepath.Join(base, "a"), filepath.Join(base, "b"), filepath.Join(base, "c")
	sock := func(name string) string {
		d := filepath.Join(base, "run-"+name)
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		return d
	}

	srv := startCLIServer(t, dirA, sock("a"))
	admin := "--admin-socket=" + srv.admin
	for _, args := range [][]string{
		{"entry", "create", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/web", "--selector", "unix:uid:1000", "--hint", "web"},
		{"entry", "create", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/db", "--selector", "unix:uid:1001", "--dns", "db.shop.svc"},
		{"token", "create", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/proxy", "--single-use", "--ttl", "1h"},
		{"x509", "mint", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/batch", "--out-dir", filepath.Join(base, "mint1")},
		{"x509", "mint", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/gone", "--out-dir", filepath.Join(base, "mint2")},
		{"revoke", "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/gone"},
		{"ca", "prepare"},
	} {
		if _, errOut, code := run(t, append(args, admin)...); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
	}
	want := srv.served(t)
	if strings.Count(want.bundle, "BEGIN CERTIFICATE") != 2 {
		t.Fatalf("bundle after ca prepare:\n%s", want.bundle)
	}

	// The server holds dirA: refused, and no target made.
	_, errOut, code := run(t, "store", "migrate", "--from", "bolt:"+dirA, "--to", "bolt:"+dirB)
	if code != 1 || !strings.Contains(errOut, "stop the server first") || strings.Count(errOut, "meshid:") != 1 {
		t.Fatalf("migrate from a running server's dir: exit %d: %s", code, errOut)
	}
	if _, err := os.Stat(dirB); !os.IsNotExist(err) {
		t.Fatalf("the refused migration made %s: %v", dirB, err)
	}
	srv.stop()
	sumA := fileSum(t, filepath.Join(dirA, migrate.BoltFile))

	out, errOut, code := run(t, "store", "migrate", "--from", "bolt:"+dirA, "--to", "bolt:"+dirB, "-o", "json")
	if code != 0 {
		t.Fatalf("migrate a -> b: exit %d: %s", code, errOut)
	}
	var rep struct {
		Source, Target map[string]int
		Bundle         []string
		CountsMatch    bool `json:"counts_match"`
		BundleMatch    bool `json:"bundle_match"`
		RowsMatch      bool `json:"rows_match"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("migrate -o json: %v\n%s", err, out)
	}
	if !rep.CountsMatch || !rep.BundleMatch || !rep.RowsMatch || len(rep.Bundle) < 2 ||
		rep.Source["entries"] != 2 || rep.Source["join_tokens"] != 1 || rep.Source["inventory_rows"] < 2 ||
		rep.Source["revoked_serials"] != 1 || rep.Source["audit_events"] == 0 || rep.Target["entries"] != 2 {
		t.Fatalf("migrate report: %+v\n%s", rep, out)
	}
	for _, step := range []string{"exporting the source", "importing into the target", "verifying the target", "KEK"} {
		if !strings.Contains(errOut, step) {
			t.Fatalf("progress on stderr lacks %q:\n%s", step, errOut)
		}
	}
	if fileSum(t, filepath.Join(dirA, migrate.BoltFile)) != sumA {
		t.Fatal("the migration changed its source")
	}

	// Into a non-empty target, and with bad specs: refused, nothing changed.
	sumB := fileSum(t, filepath.Join(dirB, migrate.BoltFile))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--from", "bolt:" + dirA, "--to", "bolt:" + dirB}, "target store is not empty: it holds 4 CA records, 2 entries"},
		{[]string{"--from", "bolt:" + dirA, "--to", "sqlite:" + dirC}, `unknown backend "sqlite"`},
		{[]string{"--from", "bolt:" + dirA, "--to", "bolt:"}, "data dir"},
		{[]string{"--from", "bolt:" + dirA, "--to", "etcd:e1:2379"}, "not an http"},
		{[]string{"--from", "bolt:" + dirC, "--to", "bolt:" + filepath.Join(base, "d")}, "no meshid store"},
		{[]string{"--from", "bolt:" + dirA, "--to", "etcd:http://127.0.0.1:1", "--etcd-prefix", "x"}, "must end in /"},
		{[]string{"--from", "bolt:" + dirA, "--to", "etcd:https://127.0.0.1:1", "--etcd-cert", "c.pem"}, "go together"},
		{[]string{"--from", "bolt:" + dirA}, "both required"},
		{[]string{"--from", "bolt:" + dirA, "--to", "bolt:" + dirC, "-o", "xml"}, "unknown output format"},
	} {
		out, errOut, code := run(t, append([]string{"store", "migrate"}, tc.args...)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(errOut, "meshid:") != 1 || out != "" {
			t.Fatalf("migrate %v: exit %d, stdout %q, stderr %q; want exit 1 and %q", tc.args, code, out, errOut, tc.want)
		}
	}
	if fileSum(t, filepath.Join(dirB, migrate.BoltFile)) != sumB || fileSum(t, filepath.Join(dirA, migrate.BoltFile)) != sumA {
		t.Fatal("a refused migration changed a store")
	}
	for _, d := range []string{dirC, filepath.Join(base, "d")} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Fatalf("a refused migration made %s: %v", d, err)
		}
	}

	// And back out of the copy, with the table summary.
	out, errOut, code = run(t, "store", "migrate", "--from", "bolt:"+dirB, "--to", "bolt:"+dirC)
	if code != 0 || !strings.Contains(out, "entries") || !strings.Contains(out, "identical on both sides") {
		t.Fatalf("migrate b -> c: exit %d: %s\n%s", code, errOut, out)
	}

	kek := "--kek-file=" + filepath.Join(dirA, "kek")
	for _, dir := range []string{dirB, dirC} {
		srv := startCLIServer(t, dir, sock(filepath.Base(dir)), kek)
		got := srv.served(t)
		srv.stop()
		if got != want {
			t.Fatalf("server on the migrated %s serves\n%+v\nthe original served\n%+v", dir, got, want)
		}
	}
}

func TestStoreHelp(t *testing.T) {
	out, _, code := run(t, "store", "--help")
	if code != 0 || !strings.Contains(out, "migrate") || !strings.Contains(out, "stop the server first") {
		t.Fatalf("store --help: exit %d\n%s", code, out)
	}
	out, _, code = run(t, "store", "migrate", "--help")
	if code != 0 || !strings.Contains(out, "No key-encryption key is needed") || !strings.Contains(out, "--kek-file") {
		t.Fatalf("store migrate --help: exit %d\n%s", code, out)
	}
	_, errOut, code := run(t, "store", "migrat")
	if code != 1 || !strings.Contains(errOut, `did you mean "migrate"`) {
		t.Fatalf("store migrat: exit %d %s", code, errOut)
	}
}
