// Package etcdtest runs real etcd clusters (the v3.7.0 binary that
// testbed/k8s/build.sh builds) as child processes on loopback for tests:
// Start gives a test its own N-member cluster whose members it can stop,
// kill and restart; Shared gives every test of a binary a fresh key prefix
// on one cluster started once, for suites that only need a working etcd.
//
// The binary is found through MESHID_ETCD_BIN (testbed/with-k8s.sh, and so
// `make test`, exports it). Without it the tests are skipped loudly, or fail
// when MESHID_ETCD_REQUIRED=1 or MESHID_K8S_REQUIRED=1.
//
// Members run with a 50 ms heartbeat and a 500 ms election timeout, which
// loopback sustains even on a loaded 2-core machine and which elects a
// leader in well under a second. fsync is kept unless Options.UnsafeNoFsync
// is set: tests about durability (kill -9 and restart) must leave it off;
// the shared cluster sets it, since nothing there is about surviving a crash.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Environment variables.
const (
	EnvBin      = "MESHID_ETCD_BIN"
	EnvRequired = "MESHID_ETCD_REQUIRED"
	envK8sReq   = "MESHID_K8S_REQUIRED"
)

// ReadyTimeout bounds the wait for a started cluster to be healthy. A cold
// start takes about a second; the bound only trips on a cluster that will
// never come up (the machine is shared with compiles).
const ReadyTimeout = 60 * time.Second

// Options configures Start.
type Options struct {
	// TLS serves the client URLs over https with client-certificate
	// authentication, with certificates from a CA made for the cluster
	// (Cluster.PKI). Peers talk plain http on loopback.
	TLS bool
	// UnsafeNoFsync passes --unsafe-no-fsync: faster, but a killed member
	// may lose acknowledged writes, so never for durability tests.
	UnsafeNoFsync bool
	// ExtraArgs are appended to every member's command line.
	ExtraArgs []string
}

// Bin returns the etcd binary to run, or skips (or fails, when required)
// t.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(EnvBin)
	if bin == "" {
		msg := "no etcd binary: set " + EnvBin + " (testbed/with-k8s.sh exports it; `make test` runs under it)"
		if os.Getenv(EnvRequired) == "1" || os.Getenv(envK8sReq) == "1" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPED, " + msg)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("etcdtest: %s=%s: %v", EnvBin, bin, err)
	}
	return bin
}

// Cluster is a running etcd cluster.
type Cluster struct {
	bin     string
	dir     string
	opts    Options
	pki     *PKI
	members []*member
}

type member struct {
	name       string
	clientURL  string
	peerURL    string
	clientAddr string
	dataDir    string
	log        string
	args       []string

	mu     sync.Mutex
	cmd    *exec.Cmd
	reaped chan struct{}
}

// Start runs an n-member cluster for t and stops it when t ends, printing
// the tail of every member's log if t failed.
func Start(t testing.TB, n int, opts ...Options) *Cluster {
	t.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	c, err := start(Bin(t), t.TempDir(), n, o)
	t.Cleanup(func() {
		if c == nil {
			return
		}
		if t.Failed() {
			c.dumpLogs(t.Logf)
		}
		c.stopAll()
	})
	if err != nil {
		if c != nil {
			c.dumpLogs(t.Logf)
		}
		t.Fatal(err)
	}
	return c
}

func start(bin, dir string, n int, o Options) (*Cluster, error) {
	if n < 1 {
		return nil, fmt.Errorf("etcdtest: %d members", n)
	}
	c := &Cluster{bin: bin, dir: dir, opts: o}
	scheme := "http"
	if o.TLS {
		pki, err := newPKI(filepath.Join(dir, "pki"))
		if err != nil {
			return nil, err
		}
		c.pki = pki
		scheme = "https"
	}
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	var initial []string
	for i := range n {
		m := &member{
			name:       "m" + strconv.Itoa(i),
			clientAddr: "127.0.0.1:" + strconv.Itoa(ports[2*i]),
			peerURL:    "http://127.0.0.1:" + strconv.Itoa(ports[2*i+1]),
			dataDir:    filepath.Join(dir, "m"+strconv.Itoa(i)),
			log:        filepath.Join(dir, "m"+strconv.Itoa(i)+".log"),
		}
		m.clientURL = scheme + "://" + m.clientAddr
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL)
	}
	for _, m := range c.members {
		m.args = []string{
			"--name=" + m.name,
			"--data-dir=" + m.dataDir,
			"--listen-client-urls=" + m.clientURL,
			"--advertise-client-urls=" + m.clientURL,
			"--listen-peer-urls=" + m.peerURL,
			"--initial-advertise-peer-urls=" + m.peerURL,
			"--initial-cluster=" + strings.Join(initial, ","),
			"--initial-cluster-state=new",
			"--initial-cluster-token=etcdtest",
			"--heartbeat-interval=50",
			"--election-timeout=500",
			"--listen-metrics-urls=",
			"--log-level=warn",
		}
		if o.UnsafeNoFsync {
			m.args = append(m.args, "--unsafe-no-fsync")
		}
		if c.pki != nil {
			m.args = append(m.args,
				"--cert-file="+c.pki.ServerCert, "--key-file="+c.pki.ServerKey,
				"--trusted-ca-file="+c.pki.CAFile, "--client-cert-auth")
		}
		m.args = append(m.args, o.ExtraArgs...)
	}
	for i := range c.members {
		if err := c.spawn(i); err != nil {
			return c, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), ReadyTimeout)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		return c, err
	}
	return c, nil
}

func (c *Cluster) spawn(i int) error {
	m := c.members[i]
	lf, err := os.OpenFile(m.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("etcdtest: %s log: %w", m.name, err)
	}
	defer lf.Close() // the child has its own copy
	cmd := exec.Command(c.bin, m.args...)
	cmd.Dir = c.dir
	cmd.Stdout, cmd.Stderr = lf, lf
	// Pdeathsig is tied to the forking thread; Go only ends a thread when a
	// goroutine exits locked to it, which nothing here does. It keeps a
	// crashed test binary from leaving members behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("etcdtest: start %s: %w", m.name, err)
	}
	reaped := make(chan struct{})
	m.mu.Lock()
	m.cmd, m.reaped = cmd, reaped
	m.mu.Unlock()
	// The waiter is owned by the member: it ends when the child exits,
	// which Stop/Kill (or the kernel on the test's death) brings about.
	go func() {
		_ = cmd.Wait()
		close(reaped)
	}()
	return nil
}

// Endpoints returns every member's client URL.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.clientURL
	}
	return out
}

// Endpoint returns member i's client URL.
func (c *Cluster) Endpoint(i int) string { return c.members[i].clientURL }

// PKI returns the cluster's certificates (nil without Options.TLS).
func (c *Cluster) PKI() *PKI { return c.pki }

// ClientTLS is the client TLS config for a TLS cluster (nil otherwise).
func (c *Cluster) ClientTLS() *tls.Config {
	if c.pki == nil {
		return nil
	}
	return c.pki.ClientTLS()
}

// Stop sends member i SIGTERM and waits for it to exit (SIGKILL after 10 s).
// A graceful stop of the Raft leader takes seconds (it hands the
// leadership over first); Kill is immediate.
func (c *Cluster) Stop(t testing.TB, i int) {
	t.Helper()
	if err := c.members[i].signal(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// Kill sends member i SIGKILL and waits for it to exit.
func (c *Cluster) Kill(t testing.TB, i int) {
	t.Helper()
	if err := c.members[i].signal(syscall.SIGKILL, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// Restart starts a stopped member again on its data dir and ports, and
// waits until it accepts connections on its client port (whether the
// cluster has a quorum again is WaitHealthy's business).
func (c *Cluster) Restart(t testing.TB, i int) {
	t.Helper()
	m := c.members[i]
	if m.running() {
		t.Fatalf("etcdtest: restart %s: still running", m.name)
	}
	if err := c.spawn(i); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(ReadyTimeout)
	for {
		conn, err := net.DialTimeout("tcp", m.clientAddr, time.Second)
		if err == nil {
			conn.Close()
			return
		}
		if !m.running() {
			c.dumpLogs(t.Logf)
			t.Fatalf("etcdtest: %s exited after restart", m.name)
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcdtest: %s not listening %s after restart: %v", m.name, ReadyTimeout, err)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition with a deadline
	}
}

// WaitHealthy waits until every running member answers /health with
// "true" (which etcd only does with a leader and a working quorum read).
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	if c.pki != nil {
		hc.Transport = &http.Transport{TLSClientConfig: c.pki.ClientTLS()}
		defer hc.CloseIdleConnections()
	}
	for _, m := range c.members {
		if !m.running() {
			continue
		}
		var last error
		for {
			last = probe(ctx, hc, m.clientURL+"/health")
			if last == nil {
				break
			}
			if !m.running() {
				return fmt.Errorf("etcdtest: %s exited (log %s): %w", m.name, m.log, last)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("etcdtest: %s not healthy (log %s): %w", m.name, m.log, last)
			case <-time.After(25 * time.Millisecond): // polling with a deadline
			}
		}
	}
	return nil
}

func probe(ctx context.Context, hc *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(buf.String(), `"health":"true"`) {
		return fmt.Errorf("%s: %s %s", url, resp.Status, strings.TrimSpace(buf.String()))
	}
	return nil
}

func (m *member) running() bool {
	m.mu.Lock()
	r := m.reaped
	m.mu.Unlock()
	if r == nil {
		return false
	}
	select {
	case <-r:
		return false
	default:
		return true
	}
}

func (m *member) signal(sig syscall.Signal, grace time.Duration) error {
	m.mu.Lock()
	cmd, reaped := m.cmd, m.reaped
	m.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-reaped:
		return nil
	default:
	}
	// Our own child, not yet reaped: its pid cannot have been reused.
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("etcdtest: signal %s: %w", m.name, err)
	}
	select {
	case <-reaped:
		return nil
	case <-time.After(grace):
	}
	_ = cmd.Process.Kill()
	select {
	case <-reaped:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("etcdtest: %s (pid %d) still running after SIGKILL", m.name, cmd.Process.Pid)
	}
}

// stopAll kills every member: the data dirs are thrown away, and a
// graceful stop costs seconds per member (etcd tries to hand its Raft
// leadership over first).
func (c *Cluster) stopAll() {
	var wg sync.WaitGroup
	for _, m := range c.members {
		wg.Go(func() { _ = m.signal(syscall.SIGKILL, 0) })
	}
	wg.Wait()
}

// dumpLogs prints the last lines of every member's log.
func (c *Cluster) dumpLogs(logf func(string, ...any)) {
	for _, m := range c.members {
		b, err := os.ReadFile(m.log)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		logf("etcdtest: last lines of %s:\n%s", m.log, strings.Join(lines, "\n"))
	}
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var out []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("etcdtest: free port: %w", err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}
