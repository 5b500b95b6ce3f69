package controlplane

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/internal/fakeclock"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/sds"
)

// gatePlane is a real server (admin socket, agent API on loopback) on a
// fake clock, and one real agent on its own unix socket.
type gatePlane struct {
	srv       *Server
	fc        *fakeclock.Clock
	admin     adminv1.AdminServiceClient
	agentSock string
	stopAgent func()
}

func startGatePlane(t *testing.T, minConv float64) *gatePlane {
	t.Helper()
	fc := fakeclock.New(time.Now())
	// CA 48 h: prepare at 24 h, activate at 32 h.
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 48 * time.Hour,
		CAPrepareWindow: time.Minute, ShortPrepareWindow: true, CAActivateMinConvergence: minConv, Now: fc.Now, AfterFunc: fc.AfterFunc})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-gate-")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: filepath.Join(dir, "admin.sock"), AgentListen: "127.0.0.1:0"}, func(l Listening) { ready <- l })
	}()
	var l Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+l.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	al, stopAgent := runTestAgent(t, ctx, agent.Config{Server: l.AgentAddr, JoinToken: tok, TrustBundle: srv.BundleCerts(), DataDir: t.TempDir(),
		Socket: filepath.Join(dir, "workload.sock")})
	t.Cleanup(func() {
		stopAgent()
		conn.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	})
	return &gatePlane{srv: srv, fc: fc, admin: adminv1.NewAdminServiceClient(conn), agentSock: al.Socket, stopAgent: stopAgent}
}

// runTestAgent opens and runs a real agent until the returned stop (which
// may be called more than once) or ctx ends.
func runTestAgent(t *testing.T, ctx context.Context, cfg agent.Config) (agent.Listening, func()) {
	t.Helper()
	a, err := agent.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(ctx)
	aready := make(chan agent.Listening, 1)
	adone := make(chan error, 1)
	go func() { adone <- a.Run(actx, func(l agent.Listening) { aready <- l }) }()
	var al agent.Listening
	select {
	case al = <-aready:
	case err := <-adone:
		acancel()
		t.Fatalf("agent run: %v", err)
	}
	stopped := false
	return al, func() {
		if stopped {
			return
		}
		stopped = true
		acancel()
		if err := <-adone; err != nil {
			t.Errorf("agent run: %v", err)
		}
		a.Close()
	}
}

// proxy is one SDS stream on the agent's socket asking for ROOTCA, driven
// by hand as Envoy would: it reads every response, and ACKs each at once
// while acking, else only when told.
type proxy struct {
	t      *testing.T
	st     grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	acking bool
	last   *discoveryv3.DiscoveryResponse
}

func openProxy(t *testing.T, socket string) *proxy {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	st, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	p := &proxy{t: t, st: st, cancel: cancel, done: make(chan struct{}), acking: true}
	go func() {
		defer close(p.done)
		for {
			r, err := st.Recv()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.last = r
			if p.acking {
				p.sendLocked(false)
			}
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-p.done; conn.Close() })
	return p
}

// sendLocked answers the last response. p.mu is held.
func (p *proxy) sendLocked(nack bool) {
	req := &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL, VersionInfo: p.last.GetVersionInfo(), ResponseNonce: p.last.GetNonce()}
	if nack {
		req.ErrorDetail = &statuspb.Status{Code: 3, Message: "rejected by test"}
	}
	_ = p.st.Send(req) // a failure ends Recv too
}

// setAcking turns ACKing every response on or off; on, it ACKs the last
// one at once.
func (p *proxy) setAcking(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.acking = on
	if on && p.last != nil {
		p.sendLocked(false)
	}
}

// nackLast NACKs the last response.
func (p *proxy) nackLast() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sendLocked(true)
}

// close ends the stream and waits for its reader.
func (p *proxy) close() { p.cancel(); <-p.done }

func (g *gatePlane) status(t *testing.T) *adminv1.StatusResponse {
	t.Helper()
	r, err := g.admin.Status(context.Background(), &adminv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (g *gatePlane) waitStatus(t *testing.T, what string, cond func(*adminv1.StatusResponse) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		r := g.status(t)
		if cond(r) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; status %v", what, r)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}

func (g *gatePlane) activeID() string {
	_, id := g.srv.activeCA()
	return id
}

func (g *gatePlane) waitActive(t *testing.T, id string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for g.activeID() != id {
		if time.Now().After(deadline) {
			t.Fatalf("CA %s not activated; active is %s; status %v", id, g.activeID(), g.status(t))
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}

func gateGauge(t *testing.T, s *Server, name string) float64 {
	t.Helper()
	mfs, err := s.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// held checks that the prepared CA is due but not active, and that ca
// show (ListCAs), Status and the metrics say so.
func (g *gatePlane) checkHeld(t *testing.T, prepared, active string, holding, streams int) {
	t.Helper()
	if got := g.activeID(); got != active {
		t.Fatalf("active CA %s, want %s still: activation was not held", got, active)
	}
	want := "activation held: " + strconv.Itoa(holding) + " of " + strconv.Itoa(streams) + " agent streams hold the prepared CA (need 100%)"
	cas, err := g.admin.ListCAs(context.Background(), &adminv1.ListCAsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range cas.GetCas() {
		if c.GetId() == prepared {
			found = true
			if !strings.HasPrefix(c.GetActivationHeld(), want) {
				t.Fatalf("ca show: activation_held %q, want %q...", c.GetActivationHeld(), want)
			}
		} else if c.GetActivationHeld() != "" {
			t.Fatalf("CA %s (%s) says %q", c.GetId(), c.GetState(), c.GetActivationHeld())
		}
	}
	if !found {
		t.Fatalf("prepared CA %s not listed", prepared)
	}
	if r := g.status(t); !strings.HasPrefix(r.GetActivationHeld(), want) || r.GetPreparedCa() != prepared {
		t.Fatalf("status %v, want activation_held %q", r, want)
	}
	if v := gateGauge(t, g.srv, "meshid_ca_activation_held"); v != 1 {
		t.Fatalf("meshid_ca_activation_held = %v, want 1", v)
	}
	if v := gateGauge(t, g.srv, "meshid_ca_activation_deadline_timestamp_seconds"); v <= float64(g.fc.Now().Unix()) {
		t.Fatalf("deadline %v is not ahead of now %d", v, g.fc.Now().Unix())
	}
}

// TestActivationWaitsForAgentConvergence: automatic activation of a
// prepared CA waits while one of an agent's SDS streams has not ACKed the
// bundle that contains it, says so in ca show, Status and the metrics,
// and proceeds as soon as that stream ACKs; next time, with the stream
// NACKing the bundle, once it closes; then once the agent disconnects.
func TestActivationWaitsForAgentConvergence(t *testing.T) {
	g := startGatePlane(t, 0)
	// The agent reports at once, with no stream open yet.
	g.waitStatus(t, "the agent's first report", func(r *adminv1.StatusResponse) bool {
		return len(r.GetAgents()) == 1 && r.GetAgents()[0].GetReported() && r.GetStreams() == 0
	})
	good, lag := openProxy(t, g.agentSock), openProxy(t, g.agentSock)
	newestAll := func(n int32) func(*adminv1.StatusResponse) bool {
		return func(r *adminv1.StatusResponse) bool {
			return r.GetStreams() == n && r.GetStreamsNewest() == n && r.GetConvergenceRatio() == 1 && len(r.GetAgents()) == 1
		}
	}
	g.waitStatus(t, "both streams on the first bundle", newestAll(2))
	if v := gateGauge(t, g.srv, "meshid_bundle_convergence_ratio"); v != 1 {
		t.Fatalf("ratio %v", v)
	}

	// rotate runs one prepare (at half the active CA's life) and the due
	// activation (at 2/3), with the laggard not ACKing the new bundle.
	rotate := func(laggard *proxy, others ...*proxy) (prepared, active string) {
		t.Helper()
		active = g.activeID()
		laggard.setAcking(false)
		pol, av := g.srv.policy(), g.srv.caByID(active)
		g.fc.Advance(pol.PrepareTime(av.lc()).Sub(g.fc.Now()) + time.Millisecond)
		pv := g.srv.preparedCA()
		if pv == nil {
			t.Fatal("no CA prepared at prepare-at")
		}
		prepared = pv.rec.ID
		n := int32(1 + len(others))
		g.waitStatus(t, "all but the laggard on the prepared CA", func(r *adminv1.StatusResponse) bool {
			return r.GetStreams() == n && r.GetStreamsPrepared() == n-1 && r.GetStreamsNewest() == n-1
		})
		if v := gateGauge(t, g.srv, "meshid_bundle_convergence_ratio"); v != float64(n-1)/float64(n) {
			t.Fatalf("meshid_bundle_convergence_ratio = %v, want %v", v, float64(n-1)/float64(n))
		}
		g.fc.Advance(pol.ActivateTime(av.lc(), pv.lc()).Sub(g.fc.Now()) + time.Millisecond)
		g.checkHeld(t, prepared, active, int(n-1), int(n))
		// Still held on a later tick: the deadline is hours away.
		g.fc.Advance(time.Hour)
		g.checkHeld(t, prepared, active, int(n-1), int(n))
		return prepared, active
	}

	// 1: the laggard ACKs at last.
	prepared, _ := rotate(lag, good)
	lag.setAcking(true)
	g.waitActive(t, prepared)
	if v := gateGauge(t, g.srv, "meshid_ca_activation_held"); v != 0 {
		t.Fatalf("held = %v after activation", v)
	}

	// 2: the laggard NACKs the bundle (still held), then goes away.
	prepared, _ = rotate(lag, good)
	lag.nackLast()
	until := time.Now().Add(1500 * time.Millisecond) // longer than the agent's report interval
	for time.Now().Before(until) {
		if g.activeID() == prepared {
			t.Fatal("activated after the laggard NACKed the prepared CA")
		}
		time.Sleep(50 * time.Millisecond) // checking that nothing changes, for a bounded time
	}
	g.checkHeld(t, prepared, g.activeID(), 1, 2)
	lag.close()
	g.waitActive(t, prepared)

	// 3: the agent disconnects.
	prepared, _ = rotate(good)
	g.stopAgent()
	g.waitActive(t, prepared)
	g.waitStatus(t, "no agents", func(r *adminv1.StatusResponse) bool { return len(r.GetAgents()) == 0 && r.GetConvergenceRatio() == 1 })
}

// With the gate off (--ca-activate-min-convergence 0), the same laggard
// does not hold activation back: it happens at the activation time.
func TestActivationGateOff(t *testing.T) {
	g := startGatePlane(t, -1)
	good, lag := openProxy(t, g.agentSock), openProxy(t, g.agentSock)
	_ = good
	g.waitStatus(t, "both streams reported", func(r *adminv1.StatusResponse) bool { return r.GetStreamsNewest() == 2 })
	lag.setAcking(false)
	pol, av := g.srv.policy(), g.srv.caByID(g.activeID())
	g.fc.Advance(pol.PrepareTime(av.lc()).Sub(g.fc.Now()) + time.Millisecond)
	pv := g.srv.preparedCA()
	if pv == nil {
		t.Fatal("no CA prepared")
	}
	g.waitStatus(t, "the good stream on the prepared CA", func(r *adminv1.StatusResponse) bool { return r.GetStreamsPrepared() == 1 })
	g.fc.Advance(pol.ActivateTime(av.lc(), pv.lc()).Sub(g.fc.Now()) + time.Millisecond)
	if got := g.activeID(); got != pv.rec.ID {
		t.Fatalf("active %s, want %s: the gate is off", got, pv.rec.ID)
	}
}
