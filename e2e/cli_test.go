package e2e

import (
	"context"
	"time"

	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// TestCLITour walks the README's tour against `meshid dev` in a subprocess.
func TestCLITour(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	wsock := filepath.Join(filepath.Dir(sock), "w.sock")
	dev := startMeshid(t, "dev", "--admin-socket", sock, "--socket", wsock, "--svid-ttl", "1h", "--spiffe-id", "spiffe://cluster.local/ns/dev/sa/me")
	dev.waitFor(t, "entry created")
	admin := "--admin-socket=" + sock

	// The workload socket serves the SPIFFE Workload API to the current
	// user: go-spiffe's own client gets the dev identity.
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	got, err := workloadapi.FetchX509SVID(wctx, workloadapi.WithAddr("unix://"+wsock))
	wcancel()
	if err != nil || got.ID.String() != "spiffe://cluster.local/ns/dev/sa/me" {
		t.Fatalf("Workload API on the dev socket: %v %v", got, err)
	}

	// The dev entry for the current uid exists.
	out, errOut, code := runCLI(t, "entry", "list", admin, "-o", "json")
	if code != 0 {
		t.Fatalf("entry list: %s", errOut)
	}
	var entries []struct {
		ID        string `json:"id"`
		SpiffeID  string `json:"spiffe_id"`
		Selectors []struct{ Type, Value string }
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		t.Fatalf("entry list -o json is not JSON: %v\n%s", err, out)
	}
	if len(entries) != 1 || entries[0].SpiffeID != "spiffe://cluster.local/ns/dev/sa/me" ||
		entries[0].Selectors[0].Value != "uid:"+strconv.Itoa(os.Getuid()) {
		t.Fatalf("dev entry = %+v", entries)
	}

	web := "spiffe://cluster.local/ns/shop/sa/web"
	out, errOut, code = runCLI(t, "entry", "create", admin, "--spiffe-id", web, "--selector", "unix:uid:1000", "-o", "json")
	if code != 0 {
		t.Fatalf("entry create: %s", errOut)
	}
	var created struct{ ID string }
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.ID == "" {
		t.Fatalf("entry create -o json: %v %q", err, out)
	}

	certs := filepath.Join(t.TempDir(), "certs")
	if _, errOut, code = runCLI(t, "x509", "mint", admin, "--spiffe-id", web, "--ttl", "30m", "--out-dir", certs); code != 0 {
		t.Fatalf("x509 mint: %s", errOut)
	}
	fi, err := os.Stat(filepath.Join(certs, "svid.key"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("svid.key mode %o, want 600", fi.Mode().Perm())
	}
	svid, err := x509svid.Load(filepath.Join(certs, "svid.pem"), filepath.Join(certs, "svid.key"))
	if err != nil {
		t.Fatalf("go-spiffe cannot load the minted files: %v", err)
	}
	bundle, err := x509bundle.Load(spiffeid.RequireTrustDomainFromString("cluster.local"), filepath.Join(certs, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if id, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil || id.String() != web {
		t.Fatalf("minted SVID does not verify against bundle.pem: id=%s err=%v", id, err)
	}
	serial := hex.EncodeToString(svid.Certificates[0].SerialNumber.Bytes())

	// bundle show: PEM equals bundle.pem; jwks parses as a SPIFFE bundle.
	out, errOut, code = runCLI(t, "bundle", "show", admin)
	bundlePEM, _ := os.ReadFile(filepath.Join(certs, "bundle.pem"))
	if code != 0 || out != string(bundlePEM) {
		t.Fatalf("bundle show (%s) differs from bundle.pem", errOut)
	}
	out, _, code = runCLI(t, "bundle", "show", admin, "--format", "jwks")
	if sb, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("cluster.local"), []byte(out)); code != 0 || err != nil || len(sb.X509Authorities()) != 1 {
		t.Fatalf("bundle show --format jwks: %v\n%s", err, out)
	}

	// ca show: the one active CA, fingerprint of the bundle's certificate.
	out, _, code = runCLI(t, "ca", "show", admin, "-o", "json")
	var cas []struct{ State, Fingerprint string }
	if err := json.Unmarshal([]byte(out), &cas); code != 0 || err != nil {
		t.Fatalf("ca show -o json: %v %s", err, out)
	}
	block, _ := pem.Decode(bundlePEM)
	sum := sha256.Sum256(block.Bytes)
	if len(cas) != 1 || cas[0].State != "active" || cas[0].Fingerprint != hex.EncodeToString(sum[:]) {
		t.Fatalf("ca show = %+v", cas)
	}

	// certs list: the minted serial, expiring within 1h but not 10m.
	for _, tc := range []struct {
		within string
		want   bool
	}{{"1h", true}, {"10m", false}, {"7d", true}} {
		out, _, code = runCLI(t, "certs", "list", admin, "--expiring-within", tc.within, "-o", "json")
		var rows []struct{ Serial string }
		if err := json.Unmarshal([]byte(out), &rows); code != 0 || err != nil {
			t.Fatalf("certs list: %v %s", err, out)
		}
		found := false
		for _, r := range rows {
			found = found || strings.TrimLeft(r.Serial, "0") == strings.TrimLeft(serial, "0")
		}
		if found != tc.want {
			t.Fatalf("certs list --expiring-within %s: serial %s found=%v, want %v (%v)", tc.within, serial, found, tc.want, rows)
		}
	}

	out, _, code = runCLI(t, "version", admin, "-o", "json")
	var ver map[string]string
	if err := json.Unmarshal([]byte(out), &ver); code != 0 || err != nil || ver["client"] == "" || ver["trust_domain"] != "cluster.local" {
		t.Fatalf("version -o json = %s (%v)", out, err)
	}

	// Bad input: exit 1 and one line saying why.
	bad := [][]string{
		{"entry", "create", admin, "--spiffe-id", "spiffe://evil.example/x", "--selector", "unix:uid:1"},
		{"entry", "create", admin, "--spiffe-id", web, "--selector", "unix:uid:1000"},
		{"entry", "create", admin, "--spiffe-id", web, "--selector", "docker:image:x"},
		{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/meshid/server", "--selector", "unix:uid:1"},
		{"token", "create", admin, "--spiffe-id", "spiffe://cluster.local/meshid/agent/x", "--ttl", "1h"},
		{"x509", "mint", admin, "--spiffe-id", web, "--ttl", "4000d", "--out-dir", certs},
		{"entry", "delete", admin, "no-such-id"},
		{"certs", "list", admin, "-o", "xml"},
		{"entry", "list", "--admin-socket", filepath.Join(t.TempDir(), "nothing.sock")},
		{"server", "--svid-ttl", "10s", "--data-dir", t.TempDir(), "--admin-socket", filepath.Join(t.TempDir(), "a.sock"), "--socket", ""},
		{"server", "--jwt-ttl", "5s", "--data-dir", t.TempDir(), "--admin-socket", filepath.Join(t.TempDir(), "a.sock"), "--socket", ""},
	}
	for _, args := range bad {
		_, errOut, code := runCLI(t, args...)
		if code != 1 || !strings.HasPrefix(errOut, "meshid: ") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line", args, code, errOut)
		}
	}

	if _, errOut, code = runCLI(t, "entry", "delete", admin, created.ID); code != 0 {
		t.Fatalf("entry delete: %s", errOut)
	}

	// SIGTERM drains and exits 0, and the socket is gone.
	dev.signal(t, syscall.SIGTERM)
	if code := dev.wait(t); code != 0 {
		t.Fatalf("meshid dev exited %d on SIGTERM:\n%s", code, dev.output())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("admin socket left behind: %v", err)
	}
}

// TestSecondServerFailsFast: a second server on the same data dir must exit
// with a clear message, not hang on the bbolt lock.
func TestSecondServerFailsFast(t *testing.T) {
	dir := t.TempDir()
	sd := sockDir(t)
	first := startMeshid(t, "server", "--data-dir", dir, "--admin-socket", filepath.Join(sd, "a.sock"), "--socket", filepath.Join(sd, "wa.sock"))
	first.waitFor(t, "msg=serving")
	second := startMeshid(t, "server", "--data-dir", dir, "--admin-socket", filepath.Join(sd, "b.sock"), "--socket", filepath.Join(sd, "wb.sock"))
	if code := second.wait(t); code != 1 {
		t.Fatalf("second server exit code %d, want 1:\n%s", code, second.output())
	}
	if out := second.output(); !strings.Contains(out, "in use by another meshid server") {
		t.Fatalf("second server's message does not say why:\n%s", out)
	}
	// And a second server on the same admin socket (other data dir) too.
	third := startMeshid(t, "server", "--data-dir", t.TempDir(), "--admin-socket", filepath.Join(sd, "a.sock"), "--socket", filepath.Join(sd, "wc.sock"))
	if code := third.wait(t); code != 1 || !strings.Contains(third.output(), "in use by another running server") {
		t.Fatalf("server on a busy admin socket: exit %d:\n%s", code, third.output())
	}
	first.signal(t, syscall.SIGTERM)
	if code := first.wait(t); code != 0 {
		t.Fatalf("first server exit %d", code)
	}
}
