package helper_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/helper"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/workload"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	idA      = "spiffe://cluster.local/ns/shop/sa/web"
	waitLong = 20 * time.Second
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func unixCaller(ctx context.Context) (identity.Caller, error) {
	pc, err := attest.PeerCredFromContext(ctx)
	if err != nil {
		return identity.Caller{}, err
	}
	return identity.Caller{Selectors: pc.Selectors(), Label: pc.String()}, nil
}

// startServer serves the Workload API of a real server on a unix socket
// and, if entry, gives this process idA. It returns the socket path.
func startServer(t *testing.T, svidTTL time.Duration, entry bool) (*controlplane.Server, string) {
	t.Helper()
	return startServerConfig(t, controlplane.Config{SVIDTTL: svidTTL}, entry)
}

// startServerConfig is startServer with a whole server config (a fake
// clock, say); DataDir and a 24 h CA TTL are filled in.
func startServerConfig(t *testing.T, cfg controlplane.Config, entry bool) (*controlplane.Server, string) {
	t.Helper()
	cfg.DataDir, cfg.CATTL = t.TempDir(), 24*time.Hour
	srv, err := controlplane.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-helper-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "w.sock")
	lis, err := controlplane.ListenUnix(socket, 0o666, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(attest.UnixCredentials()))
	wl := workload.New(srv, unixCaller, nil)
	wl.Register(gs)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	t.Cleanup(func() {
		wl.Shutdown()
		gs.GracefulStop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	})
	if entry {
		sels, err := controlplane.PIDSelectors(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := srv.CreateEntry(context.Background(), controlplane.EntrySpec{SpiffeID: idA, Selectors: sels}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	return srv, socket
}

// checkFiles loads what the helper wrote the way a program would and
// verifies the SVID against the bundle; it returns the leaf's serial.
func checkFiles(t *testing.T, dir string) string {
	t.Helper()
	return checkFilesAt(t, time.Now(), dir)
}

// checkFilesAt is checkFiles at the time now (a fake clock's).
func checkFilesAt(t *testing.T, now time.Time, dir string) string {
	t.Helper()
	svid, err := x509svid.Load(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"))
	if err != nil {
		t.Fatalf("load svid.pem + svid.key: %v", err)
	}
	bundle, err := x509bundle.Load(td, filepath.Join(dir, "bundle.pem"))
	if err != nil {
		t.Fatalf("load bundle.pem: %v", err)
	}
	id, _, err := x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(now))
	if err != nil {
		t.Fatalf("svid.pem does not verify against bundle.pem: %v", err)
	}
	if id.String() != idA {
		t.Fatalf("svid.pem is %s, want %s", id, idA)
	}
	fi, err := os.Stat(filepath.Join(dir, "svid.key"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("svid.key mode %o, want 600", fi.Mode().Perm())
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Fatalf("temporary file left behind: %s", e.Name())
		}
	}
	return svid.Certificates[0].SerialNumber.Text(16)
}

func TestOnceWritesVerifiableFiles(t *testing.T) {
	_, socket := startServer(t, time.Hour, true)
	dir := filepath.Join(t.TempDir(), "certs") // created by the helper
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	if err := helper.Run(ctx, helper.Config{Socket: socket, Dir: dir, Once: true}); err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir)
	// A key file with loose permissions is replaced by a 0600 one.
	if err := os.Chmod(filepath.Join(dir, "svid.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := helper.Run(ctx, helper.Config{Socket: "unix://" + socket, Dir: dir, Once: true}); err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir)
}

func TestOnceWithoutIdentityFails(t *testing.T) {
	_, socket := startServer(t, time.Hour, false)
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	err := helper.Run(ctx, helper.Config{Socket: socket, Dir: t.TempDir(), Once: true})
	if err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("Run: %v, want a PermissionDenied error", err)
	}
}

// events is a slog handler that reports every record with a given message.
type events struct {
	msg string
	ch  chan slog.Record
}

func (e *events) Enabled(context.Context, slog.Level) bool { return true }
func (e *events) Handle(_ context.Context, r slog.Record) error {
	if r.Message == e.msg {
		e.ch <- r
	}
	return nil
}
func (e *events) WithAttrs([]slog.Attr) slog.Handler { return e }
func (e *events) WithGroup(string) slog.Handler      { return e }

// TestReloadOncePerRenewal: the helper rewrites the files at each renewal
// and runs the reload command once per write; each run sees a new
// certificate on disk. The server runs on a fake clock: each Advance past
// the latest renewal point (55% of the SVID's life) is one renewal, so one
// write and one reload.
func TestReloadOncePerRenewal(t *testing.T) {
	const ttl = time.Hour
	fc := fakeclock.New(time.Now())
	_, socket := startServerConfig(t, controlplane.Config{SVIDTTL: ttl, Now: fc.Now, AfterFunc: fc.AfterFunc}, true)
	dir := t.TempDir()
	out := t.TempDir()
	// The reload command snapshots the certificate it was called for and
	// counts its runs.
	reload := fmt.Sprintf(`n=$(wc -l < %[1]s/count 2>/dev/null || echo 0); n=$((n+0)); cp %[2]s/svid.pem %[1]s/seen.$n.pem && echo x >> %[1]s/count`, out, dir)
	ev := &events{msg: "helper: reloaded", ch: make(chan slog.Record, 64)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- helper.Run(ctx, helper.Config{Socket: socket, Dir: dir, ReloadCmd: reload, Log: slog.New(ev)})
	}()
	const want = 3 // the first SVID and two renewals
	for i := 0; i < want; i++ {
		if i > 0 {
			fc.Advance(ttl*55/100 + time.Second)
		}
		select {
		case <-ev.ch:
			checkFilesAt(t, fc.Now(), dir)
		case err := <-done:
			t.Fatalf("helper stopped: %v", err)
		case <-time.After(waitLong):
			t.Fatalf("%d reloads, want %d", i, want)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("helper on cancel: %v", err)
		}
	case <-time.After(waitLong):
		t.Fatal("helper did not stop on cancel")
	}
	// Nothing else changed, so nothing else was written or reloaded.
	reloads := want + len(ev.ch)
	if reloads != want {
		t.Fatalf("%d reloads for %d SVIDs", reloads, want)
	}

	f, err := os.Open(filepath.Join(out, "count"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	runs := 0
	for sc := bufio.NewScanner(f); sc.Scan(); {
		runs++
	}
	if runs != reloads {
		t.Fatalf("reload command ran %d times for %d writes", runs, reloads)
	}
	serials := map[string]int{}
	for i := 0; i < runs; i++ {
		serial := leafSerial(t, filepath.Join(out, fmt.Sprintf("seen.%d.pem", i)))
		if j, dup := serials[serial]; dup {
			t.Fatalf("reload runs %d and %d saw the same certificate %s", j, i, serial)
		}
		serials[serial] = i
	}
}

func leafSerial(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s holds no certificate", path)
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return leaf.SerialNumber.Text(16)
}

// TestSignalReload: with --signal and --pid-file the helper signals the
// pid in the file after writing.
func TestSignalReload(t *testing.T) {
	_, socket := startServer(t, time.Hour, true)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	defer signal.Stop(sigs)
	pidFile := filepath.Join(t.TempDir(), "app.pid")
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	if err := helper.Run(ctx, helper.Config{Socket: socket, Dir: dir, Signal: "USR1", PIDFile: pidFile, Once: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sigs:
	case <-ctx.Done():
		t.Fatal("no SIGUSR1 after the write")
	}
	checkFiles(t, dir)
}

func TestConfigErrors(t *testing.T) {
	ok := helper.Config{Socket: "/s", Dir: "/d"}
	for _, tc := range []struct {
		name string
		mod  func(*helper.Config)
		want string
	}{
		{"no socket", func(c *helper.Config) { c.Socket = "" }, "--socket"},
		{"no dir", func(c *helper.Config) { c.Dir = "" }, "--dir"},
		{"signal without pid file", func(c *helper.Config) { c.Signal = "HUP" }, "--pid-file"},
		{"pid file without signal", func(c *helper.Config) { c.PIDFile = "/p" }, "--signal"},
		{"unknown signal", func(c *helper.Config) { c.Signal, c.PIDFile = "NOPE", "/p" }, "unknown signal"},
		{"both reloads", func(c *helper.Config) { c.ReloadCmd, c.Signal, c.PIDFile = "true", "HUP", "/p" }, "choose one"},
		{"same names", func(c *helper.Config) { c.KeyName = "svid.pem" }, "own name"},
		{"name with slash", func(c *helper.Config) { c.CertName = "../x.pem" }, "plain file name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.mod(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate: %v, want an error about %q", err, tc.want)
			}
		})
	}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]syscall.Signal{"HUP": syscall.SIGHUP, "sigusr2": syscall.SIGUSR2, "15": syscall.SIGTERM} {
		if got, err := helper.ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v", in, got, err)
		}
	}
}
