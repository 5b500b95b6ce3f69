package agent_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// startPlaneWith is startPlane with cfg (its DataDir set) and the agent API
// on listen, so a test can stop the server and bring it back on the same
// data dir and address.
func startPlaneWith(t testing.TB, cfg controlplane.Config, listen string) *plane {
	t.Helper()
	return startPlaneEndpoints(t, cfg, controlplane.Endpoints{AgentListen: listen})
}

// startPlaneEndpoints is startPlaneWith with the server's endpoints given
// (the admin socket is the test's own).
func startPlaneEndpoints(t testing.TB, cfg controlplane.Config, ep controlplane.Endpoints) *plane {
	t.Helper()
	if cfg.SVIDTTL == 0 {
		cfg.SVIDTTL, cfg.CATTL = time.Hour, 48*time.Hour
	}
	srv, err := controlplane.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-test-")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan controlplane.Listening, 1)
	done := make(chan error, 1)
	go func() {
		ep.AdminSocket = filepath.Join(sockDir, "admin.sock")
		done <- srv.Run(ctx, ep, func(l controlplane.Listening) { ready <- l })
	}()
	var l controlplane.Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	// The trust bundle as a file, as an operator hands it to an agent.
	bundle := filepath.Join(sockDir, "bundle.pem")
	b, err := x509bundle.FromX509Authorities(srv.TrustDomain(), srv.BundleCerts()).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bundle, b, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &plane{srv: srv, agentAddr: l.AgentAddr, bundle: bundle}
	stopped := false
	p.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
	}
	t.Cleanup(func() { p.stop(); os.RemoveAll(sockDir) })
	return p
}

// nodeSetup makes n entries for this uid (TTL ttl) and an agent token on p,
// and returns an agent config for them.
func nodeSetup(t *testing.T, p *plane, n int, ttl time.Duration) agent.Config {
	t.Helper()
	ctx := context.Background()
	uid := strconv.Itoa(os.Getuid())
	for i := range n {
		if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/shop/sa/w%d", i), TTL: ttl,
			Selectors: []store.Selector{{Type: "unix", Value: "uid:" + uid}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	return agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: p.srv.BundleCerts(), DataDir: t.TempDir(),
		Socket: filepath.Join(sockDir, "workload.sock")}
}

// fetchAll is what a go-spiffe workload gets from sock: SPIFFE ID → leaf.
func fetchAll(ctx context.Context, t *testing.T, sock string) map[string]*x509.Certificate {
	t.Helper()
	xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatalf("fetch from the agent: %v", err)
	}
	out := map[string]*x509.Certificate{}
	for _, s := range xc.SVIDs {
		out[s.ID.String()] = s.Certificates[0]
	}
	return out
}

// rowCount counts the workload SVIDs in the inventory (not the server's
// serving SVID, which each start mints, nor node SVIDs).
func rowCount(ctx context.Context, t *testing.T, p *plane) int {
	t.Helper()
	rows, _, err := p.srv.Store().ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range rows {
		if strings.HasPrefix(r.SpiffeID, "spiffe://cluster.local/ns/") {
			n++
		}
	}
	return n
}

// signCalls is how many SignX509SVIDs calls the server has handled.
func signCalls(t *testing.T, p *plane) int {
	t.Helper()
	mfs, err := p.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0.0
	for _, mf := range mfs {
		if mf.GetName() != "grpc_server_handled_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "grpc_method" && l.GetValue() == "SignX509SVIDs" {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return int(n)
}

// waitCacheFile waits until the sealed cache holds n SVIDs
// (meshid_agent_persisted_svids on metricsAddr): that the file exists says
// nothing of what the last write had in it.
func waitCacheFile(t *testing.T, dataDir, metricsAddr string, n int) os.FileInfo {
	t.Helper()
	waitFor(t, fmt.Sprintf("the persisted cache to hold %d SVIDs", n), func() bool {
		v, _ := scrape(t, metricsAddr, "meshid_agent_persisted_svids")
		return v == float64(n)
	})
	fi, err := os.Stat(filepath.Join(dataDir, agent.CacheFile))
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// TestRestartDuringOutageServesPersistedSVIDs: the agent restarts while
// the server is down; its workloads get their cached, still-valid SVIDs
// (same serials) from the restarted agent before it has reached the
// server, and nothing is re-minted: when the server is back the inventory
// has not grown, and signing resumes (a new entry is served, pushed).
func TestRestartDuringOutageServesPersistedSVIDs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	serverDir := t.TempDir()
	p := startPlaneWith(t, controlplane.Config{DataDir: serverDir}, "127.0.0.1:0")
	const n = 5
	cfg := nodeSetup(t, p, n, 0)
	cfg.MetricsListen = "127.0.0.1:0"
	a, l, stop := runAgent(t, cfg)
	waitFor(t, "the agent to connect", a.Connected)
	before := fetchAll(ctx, t, l.Socket)
	if len(before) != n {
		t.Fatalf("served %d SVIDs, want %d", len(before), n)
	}
	fi := waitCacheFile(t, cfg.DataDir, l.MetricsAddr, n)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("persisted cache mode %s, want 0600", fi.Mode().Perm())
	}
	rows := rowCount(ctx, t, p)
	addr := p.agentAddr
	// What the timed write left, as a kill -9 would leave it (the clean
	// stop below writes again; that write is undone).
	cachePath := filepath.Join(cfg.DataDir, agent.CacheFile)
	written, err := os.ReadFile(cachePath)
	if err != nil {
		t.Fatal(err)
	}

	// Server down, then the agent restarts (its token spent).
	p.stop()
	waitFor(t, "the agent to see the server gone", func() bool { return !a.Connected() })
	stop()
	if err := os.WriteFile(cachePath, written, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.JoinToken = ""
	a, l, stop = runAgent(t, cfg)
	defer stop()
	after := fetchAll(ctx, t, l.Socket)
	if a.Connected() {
		t.Fatal("connected to a stopped server")
	}
	if len(after) != n {
		t.Fatalf("after the restart during the outage the agent serves %d SVIDs, want the %d kept", len(after), n)
	}
	for id, leaf := range before {
		got := after[id]
		if got == nil || got.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
			t.Fatalf("%s: served %v after the restart, want the kept serial %x", id, got, leaf.SerialNumber)
		}
	}

	// The server returns (same data dir and address).
	p = startPlaneWith(t, controlplane.Config{DataDir: serverDir}, addr)
	waitFor(t, "the agent to reconnect", a.Connected)
	if got := rowCount(ctx, t, p); got != rows {
		t.Fatalf("inventory went from %d to %d rows across the restart: something was re-minted", rows, got)
	}
	// Signing resumes: a new entry reaches the waiting workload.
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	w := &recorder{ch: make(chan struct{}, 1)}
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- client.WatchX509Context(wctx, w) }()
	defer func() { wcancel(); <-watching }()
	if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/new",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new entry's SVID", func() bool { return w.latest()["spiffe://cluster.local/ns/shop/sa/new"] != nil })
	if got := rowCount(ctx, t, p); got != rows+1 {
		t.Fatalf("inventory has %d rows, want %d (the new entry's only)", got, rows+1)
	}
}

// TestPersistedCacheNeedsItsKey: the sealed cache holds no key or
// certificate in the clear, and without its key file (or truncated) it is
// useless: the agent logs why and starts empty, it does not fail.
func TestPersistedCacheNeedsItsKey(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := startPlaneWith(t, controlplane.Config{DataDir: t.TempDir()}, "127.0.0.1:0")
	cfg := nodeSetup(t, p, 1, 0)
	cfg.MetricsListen = "127.0.0.1:0"
	a, l, stop := runAgent(t, cfg)
	waitFor(t, "the agent to connect", a.Connected)
	xs, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	waitCacheFile(t, cfg.DataDir, l.MetricsAddr, 1)
	p.stop()
	stop()
	path := filepath.Join(cfg.DataDir, agent.CacheFile)
	sealed, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(xs.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, keyDER) || bytes.Contains(sealed, xs.Certificates[0].Raw) || bytes.Contains(sealed, []byte("shop")) {
		t.Fatal("the persisted cache holds the key, the certificate or the entry in the clear")
	}
	if fi, err := os.Stat(filepath.Join(cfg.DataDir, agent.DefaultCacheKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("cache key file: %v, %v", fi, err)
	}

	open := func(t *testing.T, cfg agent.Config) (*agent.Agent, agent.Listening, *syncBuffer) {
		t.Helper()
		logs := &syncBuffer{}
		cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
		cfg.JoinToken = ""
		a, l, stop := runAgent(t, cfg)
		t.Cleanup(stop)
		return a, l, logs
	}
	empty := func(t *testing.T, l agent.Listening) {
		t.Helper()
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		defer fcancel()
		if _, err := workloadapi.FetchX509SVID(fctx, workloadapi.WithAddr("unix://"+l.Socket)); err == nil {
			t.Fatal("the agent served an SVID it could not have read")
		}
	}

	// Another key file: AES-GCM does not open; the agent starts empty.
	other := cfg
	other.CacheKeyFile = filepath.Join(t.TempDir(), "other.kek")
	t.Run("wrong key", func(t *testing.T) {
		_, l, logs := open(t, other)
		empty(t, l)
		if s := logs.String(); !strings.Contains(s, "persisted SVID cache ignored") || !strings.Contains(s, "authentication failed") {
			t.Fatalf("the log does not say why the cache was ignored:\n%s", s)
		}
	})
	// The right key, a truncated file: the same.
	if err := os.WriteFile(path, sealed[:len(sealed)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("truncated", func(t *testing.T) {
		_, l, logs := open(t, cfg)
		empty(t, l)
		if s := logs.String(); !strings.Contains(s, "persisted SVID cache ignored") {
			t.Fatalf("the log does not say why the cache was ignored:\n%s", s)
		}
	})
	// Intact, with its key: served (the control for the two above).
	if err := os.WriteFile(path, sealed, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("intact", func(t *testing.T) {
		_, l, _ := open(t, cfg)
		got, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+l.Socket))
		if err != nil || got.Certificates[0].SerialNumber.Cmp(xs.Certificates[0].SerialNumber) != 0 {
			t.Fatalf("with its key the cache serves %v, %v; want serial %x", got, err, xs.Certificates[0].SerialNumber)
		}
	})
}

// TestOutageOnFakeClock: SVIDs live 2 min; the server is gone for 90 s of
// fake time while a workload watches its SVIDs: it keeps them, none ever
// expired; when the server returns, what fell due is renewed at once, in
// one batch (or a few), not one call per workload.
func TestOutageOnFakeClock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// In the past, so certificates made on it are valid for TLS, which
	// checks them on the real clock.
	fc := fakeclock.New(time.Now().Add(-30 * time.Minute))
	serverDir := t.TempDir()
	scfg := controlplane.Config{DataDir: serverDir, Now: fc.Now, AfterFunc: fc.AfterFunc}
	p := startPlaneWith(t, scfg, "127.0.0.1:0")
	const n = 10
	cfg := nodeSetup(t, p, n, 2*time.Minute)
	cfg.Now, cfg.AfterFunc = fc.Now, fc.AfterFunc
	a, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent to connect", a.Connected)

	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	w := &recorder{ch: make(chan struct{}, 1)}
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- client.WatchX509Context(wctx, w) }()
	defer func() { wcancel(); <-watching }()
	waitFor(t, "the workload's SVIDs", func() bool { return len(w.latest()) == n })
	held := w.latest()

	valid := func(what string) {
		t.Helper()
		got := w.latest()
		if len(got) != n {
			t.Fatalf("%s: the workload holds %d SVIDs, want %d", what, len(got), n)
		}
		for id, leaf := range got {
			if !fc.Now().Before(leaf.NotAfter) {
				t.Fatalf("%s: %s expired at %s (now %s)", what, id, leaf.NotAfter, fc.Now())
			}
		}
	}

	addr := p.agentAddr
	p.stop()
	waitFor(t, "the agent to see the server gone", func() bool { return !a.Connected() })
	for range 90 {
		fc.Advance(time.Second)
		valid("during the outage")
		if r := a.Ready(); r != nil {
			t.Fatalf("unready during the outage with every SVID valid: %v", r)
		}
	}
	for id, leaf := range w.latest() {
		if leaf.SerialNumber.Cmp(held[id].SerialNumber) != 0 {
			t.Fatalf("%s renewed while the server was down", id)
		}
	}

	p = startPlaneWith(t, scfg, addr)
	// The agent retries on the fake clock, at most an eighth of the budget
	// left apart: step it until it is back.
	for !a.Connected() {
		fc.Advance(250 * time.Millisecond)
		valid("reconnecting")
		deadline := time.Now().Add(200 * time.Millisecond)
		for !a.Connected() && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
		}
	}
	waitFor(t, "every SVID renewed after the outage", func() bool {
		got := w.latest()
		for id, leaf := range got {
			if leaf.SerialNumber.Cmp(held[id].SerialNumber) == 0 {
				return false
			}
		}
		return len(got) == n
	})
	valid("after the outage")
	c := signCalls(t, p)
	t.Logf("%d SVIDs renewed after the outage in %d SignX509SVIDs call(s)", n, c)
	if c < 1 || c > 3 {
		t.Fatalf("%d SignX509SVIDs calls renewed %d SVIDs that fell due during the outage, want one batch (or a few)", c, n)
	}
}

// recorder keeps a go-spiffe watcher's latest SVIDs.
type recorder struct {
	mu   sync.Mutex
	last map[string]*x509.Certificate
	ch   chan struct{}
}

func (r *recorder) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	m := map[string]*x509.Certificate{}
	for _, s := range xc.SVIDs {
		m[s.ID.String()] = s.Certificates[0]
	}
	r.mu.Lock()
	r.last = m
	r.mu.Unlock()
	select {
	case r.ch <- struct{}{}:
	default:
	}
}

func (*recorder) OnX509ContextWatchError(error) {}

func (r *recorder) latest() map[string]*x509.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestNoExpiredSVIDAfterLongOutage: an outage longer than the SVIDs live.
// At its NotAfter the agent withdraws the SVID (the workload is refused,
// never handed an expired certificate), /readyz says why and
// meshid_agent_expired_svids counts it; once the server is back the
// workload is served a fresh one.
func TestNoExpiredSVIDAfterLongOutage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	fc := fakeclock.New(time.Now().Add(-30 * time.Minute))
	scfg := controlplane.Config{DataDir: t.TempDir(), Now: fc.Now, AfterFunc: fc.AfterFunc}
	p := startPlaneWith(t, scfg, "127.0.0.1:0")
	cfg := nodeSetup(t, p, 1, 2*time.Minute)
	cfg.Now, cfg.AfterFunc = fc.Now, fc.AfterFunc
	cfg.MetricsListen = "127.0.0.1:0"
	a, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent to connect", a.Connected)
	first, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	// A workload keeps holding it (a watch), as Envoy or a go-spiffe
	// client would.
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	w := &recorder{ch: make(chan struct{}, 1)}
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- client.WatchX509Context(wctx, w) }()
	defer func() { wcancel(); <-watching }()
	waitFor(t, "the workload's SVID", func() bool { return len(w.latest()) == 1 })

	addr := p.agentAddr
	p.stop()
	waitFor(t, "the agent to see the server gone", func() bool { return !a.Connected() })
	notAfter := first.Certificates[0].NotAfter
	for fc.Now().Before(notAfter.Add(time.Second)) {
		fc.Advance(time.Second)
	}
	fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
	defer fcancel()
	if got, err := workloadapi.FetchX509SVID(fctx, workloadapi.WithAddr("unix://"+l.Socket)); err == nil {
		t.Fatalf("after its NotAfter (%s, now %s) the agent served serial %x expiring %s", notAfter, fc.Now(), got.Certificates[0].SerialNumber, got.Certificates[0].NotAfter)
	}
	if err := a.Ready(); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Ready() = %v after an identity expired, want an error saying so", err)
	}
	if v, code := scrape(t, l.MetricsAddr, "meshid_agent_expired_svids"); v != 1 || code != 503 {
		t.Fatalf("meshid_agent_expired_svids %v, /readyz %d; want 1, 503", v, code)
	}
	if v, _ := scrape(t, l.MetricsAddr, "meshid_agent_outage_budget_seconds"); v != 0 {
		t.Fatalf("outage budget %v with an identity expired, want 0", v)
	}

	p = startPlaneWith(t, scfg, addr)
	for !a.Connected() {
		fc.Advance(250 * time.Millisecond)
		deadline := time.Now().Add(200 * time.Millisecond)
		for !a.Connected() && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
		}
	}
	// Its retry, on the fake clock, is at most the capped backoff away.
	var again *x509.Certificate
	deadline := time.Now().Add(20 * time.Second)
	for again == nil {
		if time.Now().After(deadline) {
			t.Fatal("the workload was not served again once the server was back")
		}
		fc.Advance(time.Second)
		for _, leaf := range w.latest() {
			if leaf.SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 {
				again = leaf
			}
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
	if !fc.Now().Before(again.NotAfter) {
		t.Fatalf("served an SVID expiring %s at %s", again.NotAfter, fc.Now())
	}
	waitFor(t, "ready again", func() bool { return a.Ready() == nil })
}
