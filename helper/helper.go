// Package helper keeps a workload's X.509-SVID, key and trust bundle as
// files on disk, for programs that cannot speak the SPIFFE Workload API
// (nginx, databases): it watches the Workload API with go-spiffe's client,
// writes the files atomically on every update (each renewal, each bundle
// change), and then tells the program to reload, by command or by signal.
package helper

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshid/meshid/internal/fsutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"
)

// Default file names in Config.Dir.
const (
	DefaultCertName      = "svid.pem"
	DefaultKeyName       = "svid.key"
	DefaultBundleName    = "bundle.pem"
	DefaultCRLName       = "crl.pem"
	DefaultJWTSVIDName   = "jwt_svid.token"
	DefaultJWTBundleName = "jwt_bundle.json"
)

// Config says where to get the SVID, where to write it, and how to tell
// the program that uses it.
type Config struct {
	// Socket is the Workload API socket: a path, or an address such as
	// "unix:///run/meshid/workload.sock".
	Socket string
	// Dir receives the files; it is created (0755) if absent.
	Dir string
	// CertName is the SVID chain (leaf first, then intermediates), PEM.
	CertName string
	// KeyName is the SVID's private key, PKCS#8 PEM, mode 0600.
	KeyName string
	// BundleName is the trust bundle of the SVID's trust domain, PEM.
	BundleName string
	// CRLName receives the CRLs the Workload API sends with the SVID, PEM
	// ("X509 CRL" blocks), for programs that check revocation (nginx
	// ssl_crl, HAProxy crl-file).
	CRLName string
	// JWTAudience, if set, makes the helper also keep a JWT-SVID for these
	// audiences in JWTSVIDName (the bare token) and the JWT bundle in
	// JWTBundleName (JWKS), renewed at half its life: spiffe-helper's
	// jwt_svids = [{jwt_audience, jwt_svid_file_name}] and
	// jwt_bundle_file_name.
	JWTAudience   []string
	JWTSVIDName   string
	JWTBundleName string
	// ReloadCmd runs with "sh -c" after every write.
	ReloadCmd string
	// Signal ("HUP", "SIGUSR1", "1") is sent after every write to the
	// process whose pid PIDFile holds (read anew each time).
	Signal  string
	PIDFile string
	// Once writes the files (and reloads) once, then returns.
	Once bool
	// Log receives a line for every write and reload; nil discards.
	Log *slog.Logger
}

// withDefaults fills the file names.
func (c Config) withDefaults() Config {
	if c.CertName == "" {
		c.CertName = DefaultCertName
	}
	if c.KeyName == "" {
		c.KeyName = DefaultKeyName
	}
	if c.BundleName == "" {
		c.BundleName = DefaultBundleName
	}
	if c.CRLName == "" {
		c.CRLName = DefaultCRLName
	}
	if c.JWTSVIDName == "" {
		c.JWTSVIDName = DefaultJWTSVIDName
	}
	if c.JWTBundleName == "" {
		c.JWTBundleName = DefaultJWTBundleName
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first configuration mistake, in terms of the
// command's flags.
func (c Config) Validate() error {
	c = c.withDefaults()
	if c.Socket == "" {
		return errors.New("--socket is required: the Workload API socket")
	}
	if c.Dir == "" {
		return errors.New("--dir is required: the directory to write the SVID, key and bundle into")
	}
	names := map[string]string{"--cert-name": c.CertName, "--key-name": c.KeyName, "--bundle-name": c.BundleName,
		"--crl-name": c.CRLName, "--jwt-svid-file-name": c.JWTSVIDName, "--jwt-bundle-file-name": c.JWTBundleName}
	seen := map[string]string{}
	for _, flag := range []string{"--cert-name", "--key-name", "--bundle-name", "--crl-name", "--jwt-svid-file-name", "--jwt-bundle-file-name"} {
		n := names[flag]
		if n == "." || n == ".." || strings.ContainsRune(n, '/') {
			return fmt.Errorf("%s %q: want a plain file name inside --dir", flag, n)
		}
		if other, dup := seen[n]; dup {
			return fmt.Errorf("%s and %s are both %q: each file needs its own name", other, flag, n)
		}
		seen[n] = flag
	}
	for _, a := range c.JWTAudience {
		if a == "" {
			return errors.New("--jwt-audience: an audience must not be empty")
		}
	}
	if c.ReloadCmd != "" && c.Signal != "" {
		return errors.New("--reload-cmd and --signal both given: choose one way to reload")
	}
	if c.Signal != "" && c.PIDFile == "" {
		return errors.New("--signal needs --pid-file: the file holding the pid to signal")
	}
	if c.PIDFile != "" && c.Signal == "" {
		return errors.New("--pid-file needs --signal: the signal to send (e.g. HUP)")
	}
	if c.Signal != "" {
		if _, err := ParseSignal(c.Signal); err != nil {
			return fmt.Errorf("--signal: %w", err)
		}
	}
	return nil
}

// ParseSignal reads a signal by name ("HUP", "SIGHUP", "hup") or number.
func ParseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || unix.SignalName(syscall.Signal(n)) == "" {
			return 0, fmt.Errorf("unknown signal %q", s)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal %q (want a name such as HUP, USR1, TERM, or a number)", s)
	}
	return sig, nil
}

// Address turns a socket path into a Workload API address.
func Address(socket string) (string, error) {
	if strings.HasPrefix(socket, "unix:") {
		return socket, nil
	}
	abs, err := filepath.Abs(socket)
	if err != nil {
		return "", fmt.Errorf("socket %s: %w", socket, err)
	}
	return "unix://" + abs, nil
}

// Run writes the files and reloads, then, unless Once, repeats on every
// update until ctx ends, when it returns nil. It returns an error for a
// bad configuration, a directory it cannot write, and, with Once, any
// failure.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	addr, err := Address(cfg.Socket)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return fmt.Errorf("create --dir: %w", err)
	}
	client, err := dialWorkloadAPI(addr)
	if err != nil {
		return err
	}
	defer client.close()
	h := &helper{cfg: cfg, log: cfg.Log, ctx: ctx, api: client}

	if cfg.Once {
		resp, err := client.fetchX509(ctx)
		if err != nil {
			return fmt.Errorf("fetch X.509-SVID from %s: %w", cfg.Socket, err)
		}
		if len(cfg.JWTAudience) > 0 {
			if _, err := h.updateJWT(); err != nil {
				return err
			}
		}
		return h.update(resp)
	}
	cfg.Log.Info("helper: watching the Workload API", "socket", cfg.Socket, "dir", cfg.Dir)
	var wg sync.WaitGroup
	if len(cfg.JWTAudience) > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); h.keepJWT() }()
	}
	err = client.watchX509(ctx, h.OnX509Update, h.OnWatchError)
	wg.Wait()
	if ctx.Err() != nil {
		cfg.Log.Info("helper: stopped")
		return nil
	}
	return fmt.Errorf("watch %s: %w", cfg.Socket, err)
}

type helper struct {
	cfg  Config
	log  *slog.Logger
	ctx  context.Context
	api  *workloadClient
	last [4][]byte // cert, key, bundle, CRLs as last written
}

// OnX509Update is called with every Workload API response. Errors are
// logged; the files on disk stay as they were, and the next update tries
// again.
func (h *helper) OnX509Update(resp *pb.X509SVIDResponse) {
	if err := h.update(resp); err != nil && h.ctx.Err() == nil {
		h.log.Error("helper: update failed; keeping the files on disk", "err", err)
	}
}

// OnWatchError is called when the watch stream fails; it is retried with
// backoff.
func (h *helper) OnWatchError(err error, retryIn time.Duration) {
	if h.ctx.Err() == nil {
		h.log.Warn("helper: Workload API watch failed; retrying", "socket", h.cfg.Socket, "err", err, "retry_in", retryIn)
	}
}

// update writes the default (first) SVID, its bundle and the CRLs if they
// differ from what was last written, then reloads.
func (h *helper) update(resp *pb.X509SVIDResponse) error {
	if len(resp.GetSvids()) == 0 {
		return errors.New("the Workload API sent no X.509-SVID")
	}
	raw := resp.GetSvids()[0]
	svid, err := x509svid.ParseRaw(raw.GetX509Svid(), raw.GetX509SvidKey())
	if err != nil {
		return fmt.Errorf("parse SVID %s: %w", raw.GetSpiffeId(), err)
	}
	certPEM, keyPEM, err := svid.Marshal()
	if err != nil {
		return fmt.Errorf("encode SVID %s: %w", svid.ID, err)
	}
	bundle, err := x509bundle.ParseRaw(svid.ID.TrustDomain(), raw.GetBundle())
	if err != nil {
		return fmt.Errorf("bundle for %s: %w", svid.ID.TrustDomain(), err)
	}
	bundlePEM, err := bundle.Marshal()
	if err != nil {
		return fmt.Errorf("encode bundle: %w", err)
	}
	var crlPEM []byte
	for _, der := range resp.GetCrl() {
		if _, err := x509.ParseRevocationList(der); err != nil {
			return fmt.Errorf("parse CRL: %w", err)
		}
		crlPEM = append(crlPEM, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})...)
	}
	next := [4][]byte{certPEM, keyPEM, bundlePEM, crlPEM}
	if slices.EqualFunc(next[:], h.last[:], bytes.Equal) {
		h.log.Debug("helper: update without change; nothing written")
		return nil
	}
	// Each file is replaced atomically; the program is told to reload only
	// once all of them are in place.
	files := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{h.cfg.BundleName, bundlePEM, 0o644},
		{h.cfg.CRLName, crlPEM, 0o644},
		{h.cfg.KeyName, keyPEM, 0o600},
		{h.cfg.CertName, certPEM, 0o644},
	}
	for _, f := range files {
		if err := fsutil.WriteFileAtomic(filepath.Join(h.cfg.Dir, f.name), f.data, f.perm); err != nil {
			return err
		}
	}
	h.last = next
	leaf := svid.Certificates[0]
	h.log.Info("helper: wrote SVID", "spiffe_id", svid.ID.String(), "serial", leaf.SerialNumber.Text(16),
		"not_after", leaf.NotAfter, "dir", h.cfg.Dir, "bundle_cas", len(bundle.X509Authorities()), "crls", len(resp.GetCrl()))
	return h.reload()
}

// reload runs the reload command or sends the signal.
func (h *helper) reload() error {
	switch {
	case h.cfg.ReloadCmd != "":
		start := time.Now()
		cmd := exec.CommandContext(h.ctx, "sh", "-c", h.cfg.ReloadCmd)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("reload command %q: %w (output: %s)", h.cfg.ReloadCmd, err, tail(out))
		}
		// The command's own words are what an operator needs when a reload
		// misbehaves ("nginx: configuration file ... test is successful").
		h.log.Info("helper: reloaded", "cmd", h.cfg.ReloadCmd, "took", time.Since(start).Round(time.Millisecond), "output", tail(out))
	case h.cfg.Signal != "":
		sig, err := ParseSignal(h.cfg.Signal)
		if err != nil {
			return err
		}
		pid, err := readPID(h.cfg.PIDFile)
		if err != nil {
			return err
		}
		if err := syscall.Kill(pid, sig); err != nil {
			return fmt.Errorf("send %s to pid %d (from %s): %w", unix.SignalName(sig), pid, h.cfg.PIDFile, err)
		}
		h.log.Info("helper: reloaded", "signal", unix.SignalName(sig), "pid", pid)
	}
	return nil
}

func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s holds %q, not a process id", path, strings.TrimSpace(string(b)))
	}
	return pid, nil
}

func tail(b []byte) string {
	const max = 512
	s := strings.TrimSpace(string(b))
	if len(s) > max {
		s = "..." + s[len(s)-max:]
	}
	return s
}
