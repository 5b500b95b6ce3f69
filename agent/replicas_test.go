package agent_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// sharedStore lets several servers use one store, as replicas do: each
// server closes its store on Close, so the test closes the real one.
type sharedStore struct{ store.Store }

func (sharedStore) Close() error { return nil }

// replicas are servers on one store (and one KEK), each with its own
// agent listener on loopback; cfg(i) is replica i's config, to start it
// again on the same address.
type replicas struct {
	planes []*plane
	cfg    func(i int) controlplane.Config
}

func startReplicas(t *testing.T, n int, fc *fakeclock.Clock) *replicas {
	t.Helper()
	return startReplicasEndpoints(t, n, fc, controlplane.Endpoints{AgentListen: "127.0.0.1:0"})
}

// startReplicasEndpoints is startReplicas with each server's endpoints.
func startReplicasEndpoints(t *testing.T, n int, fc *fakeclock.Clock, ep controlplane.Endpoints) *replicas {
	t.Helper()
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{Now: fc.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bs.Close() }) // after every replica's (cleanups run last-in first)
	kekFile := filepath.Join(dir, "kek")
	dirs := make([]string, n)
	r := &replicas{cfg: func(i int) controlplane.Config {
		return controlplane.Config{DataDir: dirs[i], Store: sharedStore{bs}, KEKFile: kekFile, Now: fc.Now, AfterFunc: fc.AfterFunc}
	}}
	for i := range n {
		dirs[i] = t.TempDir()
		r.planes = append(r.planes, startPlaneEndpoints(t, r.cfg(i), ep))
	}
	return r
}

// addrs is the --server list of every replica.
func (r *replicas) addrs() string {
	var s []string
	for _, p := range r.planes {
		s = append(s, p.agentAddr)
	}
	return strings.Join(s, ",")
}

// index of the replica with agent address addr.
func (r *replicas) index(t *testing.T, addr string) int {
	t.Helper()
	for i, p := range r.planes {
		if p.agentAddr == addr {
			return i
		}
	}
	t.Fatalf("%q is no replica's address (%s)", addr, r.addrs())
	return -1
}

// metricsBody is the agent's /metrics and /readyz (status and body).
func metricsBody(t *testing.T, addr string) (metrics string, readyCode int, ready string) {
	t.Helper()
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	_, metrics = get("/metrics")
	readyCode, ready = get("/readyz")
	return metrics, readyCode, ready
}

// wantServerMetrics checks meshid_agent_server_info (1 for current only,
// every replica listed) and meshid_agent_server_failovers_total.
func wantServerMetrics(t *testing.T, metricsAddr string, r *replicas, current string, failovers int) {
	t.Helper()
	m, code, ready := metricsBody(t, metricsAddr)
	for _, p := range r.planes {
		v := 0
		if p.agentAddr == current {
			v = 1
		}
		if line := fmt.Sprintf("meshid_agent_server_info{address=%q} %d\n", p.agentAddr, v); !strings.Contains(m, line) {
			t.Fatalf("/metrics lacks %q (connected to %q):\n%s", line, current, grepLines(m, "meshid_agent_server"))
		}
	}
	if line := fmt.Sprintf("meshid_agent_server_failovers_total %d\n", failovers); !strings.Contains(m, line) {
		t.Fatalf("/metrics lacks %q:\n%s", line, grepLines(m, "meshid_agent_server"))
	}
	want := "serving from cache"
	if current != "" {
		want = "connected to server " + current
	}
	if code != http.StatusOK || !strings.Contains(ready, want) {
		t.Fatalf("/readyz %d %q, want 200 saying %q", code, ready, want)
	}
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// history keeps every update a go-spiffe watcher gets, checking as they
// come that no SVID it held was withdrawn and every one is valid on the
// fake clock and under the bundle.
type history struct {
	t      *testing.T
	fc     *fakeclock.Clock
	bundle *x509bundle.Bundle

	mu     sync.Mutex
	last   map[string]*x509.Certificate
	faults []string
}

func (h *history) OnX509ContextUpdate(xc *workloadapi.X509Context) {
	m := map[string]*x509.Certificate{}
	var faults []string
	for _, s := range xc.SVIDs {
		m[s.ID.String()] = s.Certificates[0]
		if now := h.fc.Now(); now.Before(s.Certificates[0].NotBefore) || !now.Before(s.Certificates[0].NotAfter) {
			faults = append(faults, fmt.Sprintf("%s served outside its validity at %s", s.ID, now))
		}
		if _, _, err := x509svid.Verify(s.Certificates, h.bundle); err != nil {
			faults = append(faults, fmt.Sprintf("%s does not verify: %v", s.ID, err))
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for id := range h.last {
		if m[id] == nil {
			faults = append(faults, id+" withdrawn from the workload")
		}
	}
	h.last = m
	h.faults = append(h.faults, faults...)
}

func (*history) OnX509ContextWatchError(error) {}

func (h *history) latest() map[string]*x509.Certificate {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last
}

// check fails the test if any update so far broke the workload, and that
// what it holds now is still valid.
func (h *history) check(what string) {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.faults) > 0 {
		h.t.Fatalf("%s: %s", what, strings.Join(h.faults, "; "))
	}
	for id, leaf := range h.last {
		if !h.fc.Now().Before(leaf.NotAfter) {
			h.t.Fatalf("%s: the workload holds %s expired at %s", what, id, leaf.NotAfter)
		}
	}
}

func watchHistory(ctx context.Context, t *testing.T, sock string, fc *fakeclock.Clock, bundle *x509bundle.Bundle) *history {
	t.Helper()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		t.Fatal(err)
	}
	h := &history{t: t, fc: fc, bundle: bundle}
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- client.WatchX509Context(wctx, h) }()
	t.Cleanup(func() { wcancel(); <-watching; client.Close() })
	return h
}

func unixEntry(id string) controlplane.EntrySpec {
	return controlplane.EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}
}

// TestAgentFailsOverBetweenReplicas: two servers on one store, an agent
// given both. It attests once and serves a watching workload; the replica
// it holds its stream with closes, and it moves to the other at once (the
// fake clock never advances: no backoff) with the same node SVID and
// agent record (no new attestation: its token is spent, one would fail).
// An entry created on the survivor reaches the workload, whose SVIDs were
// never withdrawn nor invalid. The metrics and /readyz name the replica
// and count the move. (Before replicas, --server took one address: the
// list never connected.)
func TestAgentFailsOverBetweenReplicas(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fc := fakeclock.New(time.Now().Add(-30 * time.Minute))
	r := startReplicas(t, 2, fc)
	if !r.planes[0].srv.Leading() || r.planes[1].srv.Leading() {
		t.Fatal("want the first replica, which made the CA, alone to lead")
	}
	cfg := nodeSetup(t, r.planes[0], 2, 0)
	cfg.Server = r.addrs()
	cfg.Now, cfg.AfterFunc = fc.Now, fc.AfterFunc
	cfg.MetricsListen = "127.0.0.1:0"
	a, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent to connect", a.Connected)
	first := a.Server()
	from := r.index(t, first)
	wantServerMetrics(t, l.MetricsAddr, r, first, 0)

	bundle := x509bundle.FromX509Authorities(r.planes[0].srv.TrustDomain(), r.planes[0].srv.BundleCerts())
	h := watchHistory(ctx, t, l.Socket, fc, bundle)
	waitFor(t, "the workload's SVIDs", func() bool { return len(h.latest()) == 2 })
	held := h.latest()
	serial := nodeSerial(t, cfg.DataDir)
	// The agent's bundle report reaches the replica it is on (the agent
	// looks again each second of its clock)...
	waitFor(t, "the agent's report of its workload's bundle on its replica", func() bool {
		fc.Advance(time.Second)
		return holdsNewest(t, r.planes[from], a.ID().String())
	})
	if holdsNewest(t, r.planes[1-from], a.ID().String()) {
		t.Fatal("the other replica has the agent's report before the agent moved there")
	}
	rec, err := r.planes[0].srv.Store().GetAgent(ctx, a.ID().String())
	if err != nil {
		t.Fatal(err)
	}
	// Both replicas serve the leader's CRLs: one bundle, one version.
	version := bundleVersion(t, r.planes[from])
	if v := bundleVersion(t, r.planes[1-from]); v != version {
		t.Fatalf("the replicas publish bundle versions %s and %s; want one", version, v)
	}

	r.planes[from].stop()
	survivor := r.planes[1-from]
	waitFor(t, "the agent on the other replica", func() bool { return a.Connected() && a.Server() == survivor.agentAddr })
	if a.Failovers() != 1 {
		t.Fatalf("failovers %d, want 1", a.Failovers())
	}
	wantServerMetrics(t, l.MetricsAddr, r, survivor.agentAddr, 1)
	if got := nodeSerial(t, cfg.DataDir); got != serial {
		t.Fatalf("node SVID %s after the failover, want %s: the agent attested again", got, serial)
	}
	after, err := survivor.srv.Store().GetAgent(ctx, a.ID().String())
	if err != nil {
		t.Fatal(err)
	}
	if !after.FirstSeen.Equal(rec.FirstSeen) || len(after.NodeSVIDs) != len(rec.NodeSVIDs) || after.NodeSVIDs[len(after.NodeSVIDs)-1].Serial != serial {
		t.Fatalf("agent record %+v after the failover, was %+v: attested again", after, rec)
	}
	// ...and is made again to the survivor: a new Sync stream starts with
	// no report. The survivor's bundle is the one the workload holds.
	waitFor(t, "the agent's report on the survivor", func() bool {
		fc.Advance(time.Second)
		return holdsNewest(t, survivor, a.ID().String())
	})
	if v := bundleVersion(t, survivor); v != version {
		t.Fatalf("the survivor publishes bundle version %s after the failover, was %s", v, version)
	}
	h.check("across the failover")
	for id, leaf := range h.latest() {
		if leaf.SerialNumber.Cmp(held[id].SerialNumber) != 0 {
			t.Fatalf("%s re-minted across the failover: the cache was dropped", id)
		}
	}

	// Pushed by the survivor: a new entry reaches the waiting workload.
	if _, err := survivor.srv.CreateEntry(ctx, unixEntry("spiffe://cluster.local/ns/shop/sa/after"), "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new entry's SVID through the survivor", func() bool {
		return h.latest()["spiffe://cluster.local/ns/shop/sa/after"] != nil
	})
	h.check("after the failover")
	if a.Server() != survivor.agentAddr || a.Failovers() != 1 {
		t.Fatalf("on %q after %d failovers, want %q after 1", a.Server(), a.Failovers(), survivor.agentAddr)
	}
}

// bundleVersion is the trust bundle version p's `meshid status` shows.
func bundleVersion(t *testing.T, p *plane) string {
	t.Helper()
	resp, err := controlplane.NewAdminService(p.srv).Status(context.Background(), &adminv1.StatusRequest{})
	if err != nil || resp.GetBundleVersion() == "" {
		t.Fatalf("status: %v, bundle version %q", err, resp.GetBundleVersion())
	}
	return resp.GetBundleVersion()
}

// holdsNewest reports whether p's `meshid status` has agent id reported,
// with open streams all on p's newest bundle.
func holdsNewest(t *testing.T, p *plane, id string) bool {
	t.Helper()
	resp, err := controlplane.NewAdminService(p.srv).Status(context.Background(), &adminv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range resp.Agents {
		if a.Id == id && a.Reported && a.Streams > 0 && a.StreamsNewest == a.Streams {
			return true
		}
	}
	return false
}

// logRecords keeps the agent's log records (message and attributes).
type logRecords struct {
	mu   sync.Mutex
	recs []map[string]string
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
	l.mu.Lock()
	l.recs = append(l.recs, m)
	l.mu.Unlock()
	return nil
}
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecords) WithGroup(string) slog.Handler      { return l }

// with are the records whose message starts with msg.
func (l *logRecords) with(msg string) []map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]string
	for _, r := range l.recs {
		if strings.HasPrefix(r["msg"], msg) {
			out = append(out, r)
		}
	}
	return out
}

// TestAgentRidesOutEveryReplicaDown: both replicas go. The agent serves
// its cache (same serials, ready), backs off only once a round over both
// failed, on the fake clock, doubling (each retry waits for its step: no
// round before the clock reaches it), and when one replica returns it
// reconnects to it without attesting again; that replica's new entry
// reaches the workload.
func TestAgentRidesOutEveryReplicaDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	fc := fakeclock.New(time.Now().Add(-30 * time.Minute))
	r := startReplicas(t, 2, fc)
	cfg := nodeSetup(t, r.planes[0], 2, 0)
	cfg.Server = r.addrs()
	cfg.Now, cfg.AfterFunc = fc.Now, fc.AfterFunc
	cfg.MetricsListen = "127.0.0.1:0"
	logs := &logRecords{}
	cfg.Logger = slog.New(logs)
	a, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent to connect", a.Connected)
	first := a.Server()
	bundle := x509bundle.FromX509Authorities(r.planes[0].srv.TrustDomain(), r.planes[0].srv.BundleCerts())
	h := watchHistory(ctx, t, l.Socket, fc, bundle)
	waitFor(t, "the workload's SVIDs", func() bool { return len(h.latest()) == 2 })
	held := h.latest()
	serial := nodeSerial(t, cfg.DataDir)

	// The one it is on first, then the other: its move to the other
	// fails, a full round, and only then it backs off.
	from := r.index(t, first)
	r.planes[from].stop()
	r.planes[1-from].stop()
	unreachable := func() int { return len(logs.with("server unreachable")) }
	waitFor(t, "a failed round", func() bool { return unreachable() == 1 })
	if !a.Connected() && a.Server() != "" {
		t.Fatalf("disconnected but Server() = %q", a.Server())
	}
	// (Its move may have reached the other before that one stopped.)
	wantServerMetrics(t, l.MetricsAddr, r, "", int(a.Failovers()))
	fetched := fetchAll(ctx, t, l.Socket)
	for id, leaf := range held {
		if fetched[id] == nil || fetched[id].SerialNumber.Cmp(leaf.SerialNumber) != 0 {
			t.Fatalf("during the outage %s is served %v, want the cached serial %x", id, fetched[id], leaf.SerialNumber)
		}
	}

	// Each retry waits for its step on the fake clock, and the steps
	// double (within their ±20% jitter).
	step := func(k int) time.Duration {
		t.Helper()
		rec := logs.with("server unreachable")[k-1]
		d, err := time.ParseDuration(rec["retry_in"])
		if err != nil {
			t.Fatalf("retry_in %q: %v", rec["retry_in"], err)
		}
		base := 500 * time.Millisecond << (k - 1)
		if d < base*8/10-time.Millisecond || d > base*12/10 {
			t.Fatalf("round %d: backoff %s, want %s ± 20%%", k, d, base)
		}
		return d
	}
	for k := 1; k <= 3; k++ {
		d := step(k)
		fc.Advance(d - 2*time.Millisecond)
		// The retry is the fake clock's timer: nothing may come first.
		deadline := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(deadline) {
			if unreachable() != k {
				t.Fatalf("round %d retried before its backoff of %s had passed", k, d)
			}
			time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
		}
		fc.Advance(3 * time.Millisecond) // the log truncates to the millisecond
		waitFor(t, fmt.Sprintf("round %d", k+1), func() bool { return unreachable() == k+1 })
		h.check(fmt.Sprintf("outage round %d", k))
		if err := a.Ready(); err != nil {
			t.Fatalf("unready during the outage with every SVID valid: %v", err)
		}
	}
	if n := len(logs.with("attested")); n != 1 {
		t.Fatalf("%d attestations, want the first only", n)
	}

	// One replica returns on its address: at the next step the agent is
	// back on it, whichever replica the round starts with.
	back := 1 - from
	r.planes[back] = startPlaneWith(t, r.cfg(back), r.planes[back].agentAddr)
	fc.Advance(step(4) + time.Millisecond)
	waitFor(t, "the agent on the returned replica", func() bool { return a.Connected() && a.Server() == r.planes[back].agentAddr })
	// From the one it was on to this one: one move, however the outage
	// began.
	wantServerMetrics(t, l.MetricsAddr, r, r.planes[back].agentAddr, 1)
	if got := nodeSerial(t, cfg.DataDir); got != serial {
		t.Fatalf("node SVID %s after the outage, want %s: attested again", got, serial)
	}
	if n := len(logs.with("attested")); n != 1 {
		t.Fatalf("%d attestations, want the first only", n)
	}
	if _, err := r.planes[back].srv.CreateEntry(ctx, unixEntry("spiffe://cluster.local/ns/shop/sa/back"), "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new entry's SVID", func() bool { return h.latest()["spiffe://cluster.local/ns/shop/sa/back"] != nil })
	h.check("after the outage")
}

// lagStore delivers its watch's changes lag late (real time, each from
// when it was committed), as a replica's etcd watch trails the writes of
// another replica.
type lagStore struct {
	store.Store
	lag time.Duration
}

type lagWatcher struct {
	inner store.Watcher
	out   chan store.WatchResponse
}

func (w *lagWatcher) Responses() <-chan store.WatchResponse { return w.out }
func (w *lagWatcher) Err() error                            { return w.inner.Err() }

func (l lagStore) Watch(ctx context.Context, fromRev int64) (store.Watcher, error) {
	inner, err := l.Store.Watch(ctx, fromRev)
	if err != nil {
		return nil, err
	}
	type item struct {
		resp store.WatchResponse
		at   time.Time
	}
	w := &lagWatcher{inner: inner, out: make(chan store.WatchResponse)}
	q := make(chan item, 4096)
	// Both end when the watch's ctx does: the inner channel is drained
	// until it closes, then out is closed.
	go func() {
		defer close(q)
		for resp := range inner.Responses() {
			select {
			case q <- item{resp, time.Now().Add(l.lag)}:
			case <-ctx.Done():
			}
		}
	}()
	go func() {
		defer close(w.out)
		for it := range q {
			if ctx.Err() != nil {
				continue
			}
			t := time.NewTimer(time.Until(it.at))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				continue
			}
			select {
			case w.out <- it.resp:
			case <-ctx.Done():
			}
		}
	}()
	return w, nil
}
