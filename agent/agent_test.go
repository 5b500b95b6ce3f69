package agent_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// plane is a real server with its agent API on loopback.
type plane struct {
	srv       *controlplane.Server
	agentAddr string
	bundle    string // PEM file of the trust bundle
	stop      func()
}

func startPlane(t testing.TB, dataDir string) *plane {
	t.Helper()
	return startPlaneConfig(t, controlplane.Config{DataDir: dataDir, SVIDTTL: time.Hour, CATTL: 48 * time.Hour})
}

func startPlaneConfig(t testing.TB, cfg controlplane.Config) *plane {
	t.Helper()
	return startPlaneWith(t, cfg, "127.0.0.1:0")
}

// runAgent opens and runs an agent until the test ends (or stop is
// called); it returns the agent and its socket.
func runAgent(t *testing.T, cfg agent.Config) (*agent.Agent, agent.Listening, func()) {
	t.Helper()
	a, err := agent.Open(cfg)
	if err != nil {
		t.Fatalf("open agent: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan agent.Listening, 1)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx, func(l agent.Listening) { ready <- l }) }()
	var l agent.Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("agent run: %v", err)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent run: %v", err)
		}
		a.Close()
	}
	t.Cleanup(stop)
	return a, l, stop
}

// scrape reads one metric of the agent's /metrics, and /readyz's status.
func scrape(t *testing.T, addr, metric string) (float64, int) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	val := -1.0
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, metric+" "); ok {
			if val, err = strconv.ParseFloat(rest, 64); err != nil {
				t.Fatal(err)
			}
		}
	}
	if val < 0 {
		t.Fatalf("no %s in /metrics", metric)
	}
	r, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	return val, r.StatusCode
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
	}
}

// TestAgentServesFromTheServer: an agent attests with its token, serves a
// go-spiffe client on its own socket an SVID for the entry its uid
// matches (the key made on the node, signed by the server), restarts on
// its data dir without a token, refuses a second agent on that dir, and
// keeps serving while the server is down.
func TestAgentServesFromTheServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := startPlane(t, t.TempDir())
	uid := strconv.Itoa(os.Getuid())
	e, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + uid}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	dataDir := t.TempDir()
	trust, err := os.ReadFile(p.bundle)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := agent.ParseBundlePEM(trust)
	if err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: certs, DataDir: dataDir, Socket: filepath.Join(sockDir, "workload.sock")}
	a, l, stop := runAgent(t, cfg)
	sock := l.Socket
	waitFor(t, "the agent to connect", a.Connected)
	if got := a.ID().String(); got != "spiffe://cluster.local/meshid/agent/join/web-1" {
		t.Fatalf("agent id %s", got)
	}
	fetch := func() *x509svid.SVID {
		t.Helper()
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock))
		if err != nil {
			t.Fatalf("fetch from the agent: %v", err)
		}
		return svid
	}
	svid := fetch()
	if svid.ID.String() != e.SpiffeID {
		t.Fatalf("served %s, want %s", svid.ID, e.SpiffeID)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(p.srv.TrustDomain(), p.srv.BundleCerts())); err != nil {
		t.Fatalf("the agent's SVID does not verify under the server's bundle: %v", err)
	}
	// The server signed it and recorded it, under the entry, for this agent.
	rows, _, err := p.srv.Store().ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range rows {
		if strings.EqualFold(strings.TrimLeft(r.Serial, "0"), svid.Certificates[0].SerialNumber.Text(16)) {
			found = r.EntryID == e.ID && strings.Contains(r.Requester, "agent spiffe://cluster.local/meshid/agent/join/web-1")
		}
	}
	if !found {
		t.Fatal("the agent's SVID is not in the inventory under its entry and agent")
	}

	// A second agent on the same data dir exits at once.
	if _, err := agent.Open(agent.Config{Server: p.agentAddr, DataDir: dataDir, TrustBundle: certs, Socket: filepath.Join(sockDir, "other.sock")}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second agent on one data dir: %v", err)
	}

	// Restart without the token (spent): the node identity is on disk.
	stop()
	cfg.JoinToken = ""
	cfg.MetricsListen = "127.0.0.1:0"
	a, l, stop = runAgent(t, cfg)
	sock = l.Socket
	waitFor(t, "the restarted agent to connect", a.Connected)
	if a.ID().String() != "spiffe://cluster.local/meshid/agent/join/web-1" {
		t.Fatalf("restarted as %s", a.ID())
	}
	// What the agent holds it keeps serving while the server is away.
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	held, err := client.FetchX509SVID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A workload that keeps watching holds its SVID in the cache.
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	updates := make(chan struct{}, 16)
	go func() { watching <- client.WatchX509Context(wctx, watcher{updates}) }()
	defer func() { wcancel(); <-watching }()
	select {
	case <-updates:
	case <-ctx.Done():
		t.Fatal("the watcher got no update")
	}
	if v, code := scrape(t, l.MetricsAddr, "meshid_agent_connected"); v != 1 || code != http.StatusOK {
		t.Fatalf("connected agent: meshid_agent_connected %v, /readyz %d", v, code)
	}
	p.stop()
	waitFor(t, "the agent to see the server gone", func() bool { return !a.Connected() })
	again := fetch()
	if again.Certificates[0].SerialNumber.Cmp(held.Certificates[0].SerialNumber) != 0 {
		t.Fatalf("during the outage the agent served serial %x, want the cached %x", again.Certificates[0].SerialNumber, held.Certificates[0].SerialNumber)
	}
	// Still ready: every workload is served; the budget is what is left of
	// the served SVID's life.
	v, code := scrape(t, l.MetricsAddr, "meshid_agent_connected")
	if v != 0 || code != http.StatusOK {
		t.Fatalf("during the outage: meshid_agent_connected %v, /readyz %d (want 0, 200)", v, code)
	}
	budget, _ := scrape(t, l.MetricsAddr, "meshid_agent_outage_budget_seconds")
	if left := time.Until(again.Certificates[0].NotAfter).Seconds(); budget <= 0 || budget > left+1 {
		t.Fatalf("outage budget %vs, want about %vs", budget, left)
	}
	stop()
}

type watcher struct{ ch chan struct{} }

func (w watcher) OnX509ContextUpdate(*workloadapi.X509Context) {
	select {
	case w.ch <- struct{}{}:
	default:
	}
}

func (watcher) OnX509ContextWatchError(error) {}

// TestAgentReissuesOnEntryUpdate: a change to an entry (its DNS names)
// reaches a workload watching on the agent as a new SVID at once, not at
// the next renewal.
func TestAgentReissuesOnEntryUpdate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := startPlane(t, t.TempDir())
	e, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	trust, _ := os.ReadFile(p.bundle)
	certs, err := agent.ParseBundlePEM(trust)
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	a, l, _ := runAgent(t, agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: certs, DataDir: t.TempDir(), Socket: filepath.Join(sockDir, "w.sock")})
	waitFor(t, "the agent to connect", a.Connected)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	updates := make(chan *workloadapi.X509Context, 16)
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- client.WatchX509Context(wctx, ctxWatcher{updates}) }()
	defer func() { wcancel(); <-watching }()
	first := <-updates
	if len(first.SVIDs) != 1 || len(first.SVIDs[0].Certificates[0].DNSNames) != 0 {
		t.Fatalf("first SVID: %v", first.SVIDs)
	}
	dns := []string{"web.shop.svc"}
	if _, err := p.srv.UpdateEntry(ctx, e.ID, controlplane.EntryUpdate{DNSNames: &dns}, "test"); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case x := <-updates:
			if len(x.SVIDs) == 1 && slices.Equal(x.SVIDs[0].Certificates[0].DNSNames, dns) {
				return
			}
		case <-ctx.Done():
			t.Fatal("the entry's new DNS name never reached the workload")
		}
	}
}

// TestAgentInsecureBootstrapPins: with --insecure-bootstrap and no trust
// bundle the first attestation trusts the server it reaches, and the
// bundle that server returns is kept and used from then on (a restart
// without the flag verifies the server with it).
func TestAgentInsecureBootstrapPins(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := startPlane(t, t.TempDir())
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-9", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	dataDir := t.TempDir()
	cfg := agent.Config{Server: p.agentAddr, JoinToken: tok, InsecureBootstrap: true, DataDir: dataDir, Socket: filepath.Join(sockDir, "w.sock")}
	a, _, stop := runAgent(t, cfg)
	waitFor(t, "the agent to connect", a.Connected)
	stop()
	saved, err := os.ReadFile(filepath.Join(dataDir, "bundle.pem"))
	if err != nil {
		t.Fatalf("no pinned bundle: %v", err)
	}
	certs, err := agent.ParseBundlePEM(saved)
	if err != nil || len(certs) == 0 || !certs[0].Equal(p.srv.BundleCerts()[0]) {
		t.Fatalf("pinned bundle %v (%v), want the server's CA", certs, err)
	}
	// Without the flag or a bundle file: the pinned bundle verifies it.
	a, _, _ = runAgent(t, agent.Config{Server: p.agentAddr, DataDir: dataDir, Socket: filepath.Join(sockDir, "w.sock")})
	waitFor(t, "the restarted agent to connect with the pinned bundle", a.Connected)
}

// TestAgentRefusesAServerOutsideItsBundle: an agent whose trust bundle is
// another CA's never completes a handshake with the server, so it never
// sends its join token (which a later agent with the right bundle can
// still spend).
func TestAgentRefusesAServerOutsideItsBundle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := startPlane(t, t.TempDir())
	other := startPlane(t, t.TempDir()) // another trust root
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-8", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	a, _, stop := runAgent(t, agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: other.srv.BundleCerts(),
		DataDir: t.TempDir(), Socket: filepath.Join(sockDir, "w.sock"), Logger: log})
	waitFor(t, "a refused attempt", func() bool { return strings.Contains(buf.String(), "not an SVID") })
	if a.Connected() {
		t.Fatal("connected to a server outside its bundle")
	}
	stop()
	right := agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: p.srv.BundleCerts(), DataDir: t.TempDir(), Socket: filepath.Join(sockDir, "w2.sock")}
	b, _, _ := runAgent(t, right)
	waitFor(t, "the token, unspent, to attest the right agent", b.Connected)
}
