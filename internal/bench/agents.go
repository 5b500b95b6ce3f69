package bench

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
)

// Fan-out triggers: what changes the bundle once every agent holds its
// Sync stream.
const (
	// FanoutRevoke revokes one SVID the run was issued: the CRLs are
	// re-signed, so the bundle's version changes. It leaves the server's
	// CAs as they were, so runs can be repeated.
	FanoutRevoke = "revoke"
	// FanoutPrepare prepares a new CA (one more authority in the bundle).
	FanoutPrepare = "prepare"
	// FanoutNone skips the fan-out.
	FanoutNone = "none"
)

// maxSignBatch is the most CSRs the server takes in one SignX509SVIDs
// call (controlplane.MaxSignBatch); a node with more entries sends several.
const maxSignBatch = 1000

// AgentsConfig describes a node-agent load: one process speaking the agent
// API (proto/meshid/agent/v1) as many agents at once, each as `meshid
// agent` does: Attest with an agent join token, then over mTLS with the
// node SVID one Sync stream and SignX509SVIDs batches.
type AgentsConfig struct {
	// Server is the agent API, host:port (meshid server --agent-listen).
	Server string
	// AdminSocket is the server's admin API, used to set the run up
	// (tokens, entries) and to trigger the fan-out.
	AdminSocket string
	// MetricsURL is the server's /metrics, scraped before the agents
	// connect, once all hold their Sync streams (and SVIDs), and at the end.
	MetricsURL string
	Agents     int
	// Workloads is how many entries each agent is entitled to.
	Workloads int
	// Shared makes Workloads entries without a parent (every agent may
	// serve all of them) instead of Workloads entries per agent, each with
	// that agent as --parent-id.
	Shared bool
	// Concurrency bounds the agents in their cold start (attest to last
	// SVID) at once; 0 means 64.
	Concurrency int
	// SetupConcurrency bounds the admin calls of the set-up; 0 means 16.
	SetupConcurrency int
	// NodePrefix names the agents <prefix>-<i>; empty means bench-<random>,
	// so that entries a previous run made for its agents are not served
	// to this run's.
	NodePrefix string
	// Fanout is FanoutRevoke (default), FanoutPrepare or FanoutNone.
	Fanout string
	// Timeout bounds the cold start and, separately, the fan-out; 0 means
	// 2 minutes.
	Timeout time.Duration
	// Hold keeps the streams open (idle) for this long after the fan-out,
	// before the last scrape.
	Hold time.Duration
	// KeygenInline makes every agent's keys and CSRs on the clock, in its
	// cold start. By default they are made before the clock starts, so the
	// figure measures the server, not the load generator sharing its CPUs.
	KeygenInline bool
	// VerifyInventory pages through the inventory afterwards and checks
	// that every serial issued is recorded for its entry.
	VerifyInventory bool
	// Progress, if set, is called about once a second with a status line.
	Progress func(line string)
}

// AgentsResult is what a node-agent load measured.
type AgentsResult struct {
	Agents     int    `json:"agents"`
	Workloads  int    `json:"workloads"`
	Mode       string `json:"mode"` // "per-agent" or "shared"
	NodePrefix string `json:"node_prefix"`
	// Entries are those the set-up made.
	Entries int `json:"entries"`
	// Setup is the admin calls making the tokens and entries; KeyPrep the
	// keys and CSRs made before the clock (zero with KeygenInline).
	Setup   time.Duration `json:"setup_ns"`
	KeyPrep time.Duration `json:"key_prep_ns"`
	// ColdStart is from the first Attest to the last SVID signed.
	ColdStart AgentsColdStart `json:"cold_start"`
	Metrics   *AgentsMetrics  `json:"metrics,omitempty"`
	Fanout    *FanoutResult   `json:"fanout,omitempty"`
	// ForeignEntries are entries served to the agents that this run did
	// not make (entries without a parent already on the server), summed
	// over the agents. They are not signed.
	ForeignEntries   int    `json:"foreign_entries"`
	InventoryChecked int    `json:"inventory_checked"`
	Errors           int64  `json:"errors"`
	FirstError       string `json:"first_error,omitempty"`
	// Elapsed is the whole run, set-up included.
	Elapsed time.Duration `json:"elapsed_ns"`
	// Details has one row per agent (for tests; not in the JSON output).
	Details []AgentDetail `json:"-"`
}

// AgentsColdStart is the cold start's figures.
type AgentsColdStart struct {
	Elapsed time.Duration `json:"elapsed_ns"`
	// Attested agents got a node SVID, Synced ones a Sync stream with all
	// their entries, Ready ones an SVID for every entry.
	Attested        int     `json:"attested"`
	Synced          int     `json:"synced"`
	Ready           int     `json:"ready"`
	SVIDs           int     `json:"svids"`
	AgentsPerSecond float64 `json:"agents_per_second"`
	SVIDsPerSecond  float64 `json:"svids_per_second"`
	// Per agent: the Attest call, from the mTLS dial to the Sync stream
	// holding all entries, the SignX509SVIDs batches, and all of it (from
	// the agent's start, not counting its wait for a concurrency slot).
	Attest Latency `json:"attest"`
	Sync   Latency `json:"sync"`
	Sign   Latency `json:"sign"`
	Total  Latency `json:"total"`
}

// AgentsMetrics are the server's figures around the load.
type AgentsMetrics struct {
	Before ServerSample `json:"before"`
	// Up is scraped once every agent holds its Sync stream and SVIDs; End
	// after the fan-out and Hold, just before the streams close.
	Up          ServerSample `json:"up"`
	End         ServerSample `json:"end"`
	PerAgentUp  PerStream    `json:"per_agent_up"`
	PerAgentEnd PerStream    `json:"per_agent_end"`
}

// FanoutResult is what the bundle fan-out measured.
type FanoutResult struct {
	Trigger string `json:"trigger"`
	// Serial is the SVID revoked (FanoutRevoke).
	Serial string `json:"serial,omitempty"`
	// Call is the admin call's own latency.
	Call time.Duration `json:"call_ns"`
	// Targets are the agents holding a Sync stream when the call was made;
	// Got how many of them received a bundle of a new version, Checked
	// how many of those bundles carry the change (the revoked serial on a
	// CRL; one more CA).
	Targets int `json:"targets"`
	Got     int `json:"got"`
	Checked int `json:"checked"`
	// FromReturn is from the admin call's return to each agent's new
	// bundle (0 for one that came before the call returned); FromStart
	// from the call's start.
	FromReturn Latency `json:"from_return"`
	FromStart  Latency `json:"from_start"`
}

// AgentDetail is what one simulated agent saw.
type AgentDetail struct {
	NodeID   string
	SpiffeID string
	// Entries are the IDs of this run's entries the agent was sent;
	// Serials the SVIDs it was issued, by entry ID.
	Entries []string
	Serials map[string]string
	// FanoutVersion is the bundle version that ended the fan-out for it.
	FanoutVersion string
}

// benchEntry is an entry the set-up made.
type benchEntry struct {
	id, spiffeID string
	agent        int // -1: shared
}

// simAgent is one simulated node agent.
type simAgent struct {
	i        int
	node     string
	token    string
	id       spiffeid.ID
	nodeKey  crypto.Signer
	nodeCSR  []byte
	keys     []crypto.Signer // workload keys, one per entry
	csrs     [][]byte
	expected map[string]bool // entry IDs of this run it must be sent

	attest, sync, sign, total time.Duration
	entries                   []string
	serials                   map[string]string
	foreign                   int

	// mu guards ready and the fan-out fields.
	mu    sync.Mutex
	ready bool

	// Fan-out: the bundle it holds, and when a new one came.
	bundleVersion string
	authorities   int
	fanAt         time.Time
	fanVersion    string
	fanChecked    bool
}

// agentsRun is the state shared by the agents of one run.
type agentsRun struct {
	cfg       AgentsConfig
	td        spiffeid.TrustDomain
	serverID  spiffeid.ID
	trust     *x509bundle.Bundle
	entryByID map[string]benchEntry
	shared    []benchEntry

	attested, synced, ready, svids atomic.Int64
	settled                        atomic.Int64 // ready or failed
	errs                           atomic.Int64
	firstErr                       atomic.Value // string
	lastReady                      atomic.Int64 // unix nanos

	// The fan-out: armed (unix nanos of the call's start) just before the
	// admin call; what every new bundle must carry.
	fanStart   atomic.Int64
	fanSerial  atomic.Value // *big.Int
	fanCAs     atomic.Int64 // authorities expected, FanoutPrepare
	fanGot     atomic.Int64
	fanArrived chan struct{} // one send per agent that got its new bundle
}

func (r *agentsRun) fail(format string, args ...any) {
	r.errs.Add(1)
	for i, a := range args {
		if err, ok := a.(error); ok {
			if s, ok := status.FromError(err); ok {
				args[i] = s.Code().String() + ": " + s.Message()
			}
		}
	}
	r.firstErr.CompareAndSwap(nil, fmt.Sprintf(format, args...))
}

// Agents runs the load and returns its figures.
func Agents(ctx context.Context, cfg AgentsConfig) (AgentsResult, error) {
	if cfg.Agents <= 0 || cfg.Workloads <= 0 {
		return AgentsResult{}, errors.New("agents and workloads must be positive")
	}
	if cfg.Server == "" || cfg.AdminSocket == "" {
		return AgentsResult{}, errors.New("the agent API address and the admin socket are required")
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 64
	}
	if cfg.SetupConcurrency <= 0 {
		cfg.SetupConcurrency = 16
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Minute
	}
	switch cfg.Fanout {
	case "":
		cfg.Fanout = FanoutRevoke
	case FanoutRevoke, FanoutPrepare, FanoutNone:
	default:
		return AgentsResult{}, fmt.Errorf("fan-out trigger %q: want %s, %s or %s", cfg.Fanout, FanoutRevoke, FanoutPrepare, FanoutNone)
	}
	if cfg.NodePrefix == "" {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return AgentsResult{}, err
		}
		cfg.NodePrefix = "bench-" + hex.EncodeToString(b[:])
	}
	if l := len(cfg.NodePrefix) + 1 + len(strconv.Itoa(cfg.Agents-1)); l > 63 {
		return AgentsResult{}, fmt.Errorf("node prefix %q is too long: node names have at most 63 characters", cfg.NodePrefix)
	}
	start := time.Now()
	res := AgentsResult{Agents: cfg.Agents, Workloads: cfg.Workloads, Mode: "per-agent", NodePrefix: cfg.NodePrefix}
	if cfg.Shared {
		res.Mode = "shared"
	}

	ac, err := dial(cfg.AdminSocket)
	if err != nil {
		return res, err
	}
	defer ac.Close()
	admin := adminv1.NewAdminServiceClient(ac)
	b, err := admin.GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		return res, fmt.Errorf("GetBundle: %w", err)
	}
	td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
	if err != nil {
		return res, fmt.Errorf("trust domain %q: %w", b.GetTrustDomain(), err)
	}
	r := &agentsRun{cfg: cfg, td: td, entryByID: map[string]benchEntry{}, fanArrived: make(chan struct{}, cfg.Agents)}
	r.serverID, _ = spiffeid.FromSegments(td, "meshid", "server")
	var cas []*x509.Certificate
	for _, der := range b.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return res, fmt.Errorf("bundle: %w", err)
		}
		cas = append(cas, c)
	}
	r.trust = x509bundle.FromX509Authorities(td, cas)

	agents := make([]*simAgent, cfg.Agents)
	for i := range agents {
		node := cfg.NodePrefix + "-" + strconv.Itoa(i)
		id, err := spiffeid.FromSegments(td, "meshid", "agent", "join", node)
		if err != nil {
			return res, fmt.Errorf("agent id for node %q: %w", node, err)
		}
		agents[i] = &simAgent{i: i, node: node, id: id, expected: map[string]bool{}, serials: map[string]string{}}
	}

	progress := func(line string) {
		if cfg.Progress != nil {
			cfg.Progress(line)
		}
	}
	t0 := time.Now()
	if err := r.setup(ctx, admin, agents, progress); err != nil {
		return res, err
	}
	res.Setup = time.Since(t0)
	res.Entries = len(r.entryByID)

	if !cfg.KeygenInline {
		t0 := time.Now()
		if err := prepareKeys(agents, cfg.Workloads); err != nil {
			return res, err
		}
		res.KeyPrep = time.Since(t0)
	}

	if cfg.MetricsURL != "" {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics = &AgentsMetrics{Before: s}
	}

	// Cold start: every agent attests, syncs and signs, at most
	// Concurrency of them at once; then holds its stream until sctx ends.
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	coldProgress := func() {
		progress(fmt.Sprintf("cold start: attested %d  synced %d  ready %d/%d  SVIDs %d  errors %d",
			r.attested.Load(), r.synced.Load(), r.ready.Load(), cfg.Agents, r.svids.Load(), r.errs.Load()))
	}
	sem := make(chan struct{}, cfg.Concurrency)
	coldStart := time.Now()
	deadline := coldStart.Add(cfg.Timeout)
	timedOut := false
	started := 0
launch:
	for started < cfg.Agents {
		select {
		case sem <- struct{}{}:
			a := agents[started]
			started++
			wg.Go(func() { r.runAgent(sctx, a, func() { <-sem }) })
		case <-tick.C:
			coldProgress()
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(time.Until(deadline)):
			timedOut = true
			break launch
		}
	}
	for !timedOut && r.settled.Load() < int64(cfg.Agents) {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-tick.C:
			coldProgress()
		case <-time.After(2 * time.Millisecond):
			timedOut = time.Now().After(deadline)
		}
	}
	coldProgress()
	cs := &res.ColdStart
	cs.Attested, cs.Synced, cs.Ready, cs.SVIDs = int(r.attested.Load()), int(r.synced.Load()), int(r.ready.Load()), int(r.svids.Load())
	if lr := r.lastReady.Load(); lr != 0 {
		cs.Elapsed = time.Unix(0, lr).Sub(coldStart)
		cs.AgentsPerSecond = float64(cs.Ready) / cs.Elapsed.Seconds()
		cs.SVIDsPerSecond = float64(cs.SVIDs) / cs.Elapsed.Seconds()
	}
	// The per-agent figures are written by each agent before it counts
	// itself settled; agents still running (timed out) are left out.
	var att, syn, sig, tot []time.Duration
	for _, a := range agents {
		if a.isReady() {
			att, syn, sig, tot = append(att, a.attest), append(syn, a.sync), append(sig, a.sign), append(tot, a.total)
			res.ForeignEntries += a.foreign
		}
	}
	cs.Attest, cs.Sync, cs.Sign, cs.Total = summarize(att), summarize(syn), summarize(sig), summarize(tot)

	if res.Metrics != nil {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics.Up = s
		res.Metrics.PerAgentUp = perStream(res.Metrics.Before, s, cs.Ready)
	}

	if cfg.Fanout != FanoutNone && !timedOut && cs.Ready > 0 {
		fr, err := r.fanout(ctx, admin, agents, tick, progress)
		if err != nil {
			return res, err
		}
		res.Fanout = fr
	}

	if cfg.Hold > 0 {
		progress(fmt.Sprintf("holding %d streams for %s", cs.Ready, cfg.Hold))
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(cfg.Hold):
		}
	}
	if res.Metrics != nil {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics.End = s
		res.Metrics.PerAgentEnd = perStream(res.Metrics.Before, s, cs.Ready)
	}
	stop()
	wg.Wait()

	if cfg.VerifyInventory {
		n, err := r.checkInventory(ctx, admin, agents)
		if err != nil {
			return res, err
		}
		res.InventoryChecked = n
	}
	for _, a := range agents {
		res.Details = append(res.Details, AgentDetail{NodeID: a.node, SpiffeID: a.id.String(), Entries: a.entries, Serials: a.serials, FanoutVersion: a.fanVersion})
	}
	res.Errors = r.errs.Load()
	if s, ok := r.firstErr.Load().(string); ok {
		res.FirstError = s
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

// setup makes a join token per agent and the entries, concurrently.
func (r *agentsRun) setup(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent, progress func(string)) error {
	type job func(context.Context) error
	var jobs []job
	var mu sync.Mutex
	for _, a := range agents {
		jobs = append(jobs, func(ctx context.Context) error {
			t, err := admin.CreateJoinToken(ctx, &adminv1.CreateJoinTokenRequest{Agent: true, NodeId: a.node, Ttl: durationpb.New(time.Hour)})
			if err != nil {
				return fmt.Errorf("CreateJoinToken for node %s: %w", a.node, err)
			}
			if t.GetSpiffeId() != a.id.String() {
				return fmt.Errorf("token for node %s grants %s, not %s", a.node, t.GetSpiffeId(), a.id)
			}
			a.token = t.GetToken()
			return nil
		})
	}
	create := func(agent int, j int) job {
		return func(ctx context.Context) error {
			e := &adminv1.Entry{
				// uids far above any real one: the server's own workload
				// socket must not serve a shared bench entry to a local
				// process.
				Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(3_000_000_000+j)}},
			}
			if agent >= 0 {
				a := agents[agent]
				e.SpiffeId = fmt.Sprintf("spiffe://%s/ns/bench/sa/%s-w%d", r.td.Name(), a.node, j)
				e.ParentId = a.id.String()
			} else {
				e.SpiffeId = fmt.Sprintf("spiffe://%s/ns/bench/sa/%s-shared-w%d", r.td.Name(), r.cfg.NodePrefix, j)
			}
			resp, err := admin.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: e})
			if err != nil {
				return fmt.Errorf("CreateEntry %s: %w", e.SpiffeId, err)
			}
			be := benchEntry{id: resp.GetEntry().GetId(), spiffeID: resp.GetEntry().GetSpiffeId(), agent: agent}
			mu.Lock()
			defer mu.Unlock()
			r.entryByID[be.id] = be
			if agent >= 0 {
				agents[agent].expected[be.id] = true
			} else {
				r.shared = append(r.shared, be)
			}
			return nil
		}
	}
	if r.cfg.Shared {
		for j := range r.cfg.Workloads {
			jobs = append(jobs, create(-1, j))
		}
	} else {
		for i := range agents {
			for j := range r.cfg.Workloads {
				jobs = append(jobs, create(i, j))
			}
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next, done atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range r.cfg.SetupConcurrency {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(jobs) {
					return
				}
				if err := jobs[i](ctx); err != nil {
					firstErr.CompareAndSwap(nil, err)
					cancel()
					return
				}
				done.Add(1)
			}
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case <-finished:
			waiting = false
		case <-tick.C:
			progress(fmt.Sprintf("set-up: %d/%d tokens and entries", done.Load(), len(jobs)))
		}
	}
	if err, ok := firstErr.Load().(error); ok {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if r.cfg.Shared {
		for _, a := range agents {
			for _, e := range r.shared {
				a.expected[e.id] = true
			}
		}
	}
	return nil
}

func newKey() (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// makeKeys gives a its node key and one workload key per entry.
func (a *simAgent) makeKeys(workloads int) error {
	var err error
	if a.nodeKey, a.nodeCSR, err = newKey(); err != nil {
		return fmt.Errorf("node key: %w", err)
	}
	a.keys, a.csrs = make([]crypto.Signer, workloads), make([][]byte, workloads)
	for j := range workloads {
		if a.keys[j], a.csrs[j], err = newKey(); err != nil {
			return fmt.Errorf("workload key: %w", err)
		}
	}
	return nil
}

// prepareKeys makes every agent's keys before the clock, on every CPU.
func prepareKeys(agents []*simAgent, workloads int) error {
	var wg sync.WaitGroup
	var firstErr atomic.Value
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(agents); i += workers {
				if err := agents[i].makeKeys(workloads); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return fmt.Errorf("prepare keys: %w", err)
	}
	return nil
}

// verifyServer checks the server's certificate as the agent does: an SVID
// of the trust domain under the bundle, naming the server.
func (r *agentsRun) verifyServer(raw [][]byte, _ [][]*x509.Certificate) error {
	var certs []*x509.Certificate
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("server certificate: %w", err)
		}
		certs = append(certs, c)
	}
	id, _, err := x509svid.Verify(certs, r.trust)
	if err != nil {
		return fmt.Errorf("server certificate is not an SVID of %s under the bundle: %w", r.td, err)
	}
	if id != r.serverID {
		return fmt.Errorf("server certificate names %s, not %s", id, r.serverID)
	}
	return nil
}

// agentDial opens a connection to the agent API, with cert as the client
// certificate (none for Attest). Buffers are kept small, as in the SDS
// load: a thousand connections in one process.
func (r *agentsRun) agentDial(cert *tls.Certificate) (*grpc.ClientConn, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verified by VerifyPeerCertificate, against the SPIFFE ID.
		InsecureSkipVerify:    true, //nolint:gosec
		VerifyPeerCertificate: r.verifyServer,
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return grpc.NewClient("passthrough:///"+r.cfg.Server,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(4096))
}

// runAgent is one agent's life: attest, open Sync and wait for all its
// entries, sign an SVID for each, release its slot; then hold the stream,
// watching for the fan-out's bundle, until ctx ends.
func (r *agentsRun) runAgent(ctx context.Context, a *simAgent, slot func()) {
	released := false
	release := func() {
		if !released {
			released = true
			r.settled.Add(1)
			slot()
		}
	}
	defer release()
	fail := func(format string, args ...any) {
		if ctx.Err() == nil {
			r.fail("agent "+a.node+": "+format, args...)
		}
	}
	t0 := time.Now()
	if a.nodeKey == nil {
		if err := a.makeKeys(r.cfg.Workloads); err != nil {
			fail("%v", err)
			return
		}
	}

	// Attest: TLS authenticating the server only; the proof is the token.
	cc, err := r.agentDial(nil)
	if err != nil {
		fail("dial: %v", err)
		return
	}
	resp, err := agentv1.NewAgentServiceClient(cc).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(a.token), Csr: a.nodeCSR})
	cc.Close()
	if err != nil {
		fail("attest: %v", err)
		return
	}
	cert, err := nodeCert(a.nodeKey, resp.GetSvidChain(), a.id)
	if err != nil {
		fail("%v", err)
		return
	}
	a.noteBundle(resp.GetBundle())
	r.attested.Add(1)
	t1 := time.Now()

	cc, err = r.agentDial(cert)
	if err != nil {
		fail("dial: %v", err)
		return
	}
	defer cc.Close()
	client := agentv1.NewAgentServiceClient(cc)
	stream, err := client.Sync(ctx)
	if err != nil {
		fail("sync: %v", err)
		return
	}
	// Responses until every entry this run made for the agent is in.
	held := map[string]bool{}
	for len(held) < len(a.expected) {
		msg, err := stream.Recv()
		if err != nil {
			fail("sync: %v", err)
			return
		}
		if msg.GetFull() {
			clear(held)
			a.foreign = 0
		}
		for _, e := range msg.GetEntries() {
			switch {
			case a.expected[e.GetId()]:
				held[e.GetId()] = true
			case r.entryByID[e.GetId()].id != "":
				fail("sent entry %s, made for another agent (parent %s)", e.GetId(), e.GetParentId())
				return
			default:
				a.foreign++
			}
		}
		for _, id := range msg.GetDeletedEntryIds() {
			delete(held, id)
		}
		if b := msg.GetBundle(); b != nil {
			a.noteBundle(b)
		}
	}
	r.synced.Add(1)
	t2 := time.Now()

	// One CSR per entry, as few batches as the server allows.
	ids := make([]string, 0, len(held))
	for id := range held {
		ids = append(ids, id)
	}
	for lo := 0; lo < len(ids); lo += maxSignBatch {
		batch := ids[lo:min(lo+maxSignBatch, len(ids))]
		req := &agentv1.SignX509SVIDsRequest{}
		for k, id := range batch {
			req.Csrs = append(req.Csrs, &agentv1.CSRForEntry{EntryId: id, Csr: a.csrs[lo+k]})
		}
		out, err := client.SignX509SVIDs(ctx, req)
		if err != nil {
			fail("sign: %v", err)
			return
		}
		if len(out.GetSvids()) != len(batch) {
			fail("sign: %d answers for %d CSRs", len(out.GetSvids()), len(batch))
			return
		}
		for k, s := range out.GetSvids() {
			id := batch[k]
			if s.GetCode() != 0 || s.GetEntryId() != id {
				fail("sign entry %s: code %d: %s (answer for %s)", id, s.GetCode(), s.GetMessage(), s.GetEntryId())
				return
			}
			serial, err := checkSVID(s.GetSvidChain(), a.keys[lo+k], r.entryByID[id].spiffeID)
			if err != nil {
				fail("entry %s: %v", id, err)
				return
			}
			a.serials[id] = serial
			r.svids.Add(1)
		}
	}
	t3 := time.Now()
	a.attest, a.sync, a.sign, a.total = t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t3.Sub(t0)
	a.entries = ids
	a.mu.Lock()
	a.ready = true // read under mu: a timed-out run reads while agents still run
	a.mu.Unlock()
	r.ready.Add(1)
	r.lastReady.Store(t3.UnixNano())
	release()

	// Hold the stream: every bundle after the fan-out is armed is checked
	// once.
	for {
		msg, err := stream.Recv()
		if err != nil {
			fail("sync: %v", err)
			return
		}
		if b := msg.GetBundle(); b != nil {
			r.bundleArrived(a, b)
		}
	}
}

func (a *simAgent) isReady() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ready
}

// noteBundle records the bundle an agent holds before the fan-out.
func (a *simAgent) noteBundle(b *agentv1.Bundle) {
	if b == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.bundleVersion, a.authorities = b.GetVersion(), len(b.GetX509Authorities())
}

// bundleArrived handles a bundle on a held stream: the first new version
// after the fan-out was armed ends the agent's wait.
func (r *agentsRun) bundleArrived(a *simAgent, b *agentv1.Bundle) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.bundleVersion
	prevCAs := a.authorities
	a.bundleVersion, a.authorities = b.GetVersion(), len(b.GetX509Authorities())
	if r.fanStart.Load() == 0 || !a.fanAt.IsZero() || b.GetVersion() == old {
		return
	}
	a.fanAt, a.fanVersion = now, b.GetVersion()
	switch r.cfg.Fanout {
	case FanoutRevoke:
		serial, _ := r.fanSerial.Load().(*big.Int)
		a.fanChecked = serial != nil && crlsList(b.GetCrls(), serial)
	case FanoutPrepare:
		a.fanChecked = len(b.GetX509Authorities()) > prevCAs
	}
	r.fanGot.Add(1)
	r.fanArrived <- struct{}{}
}

// crlsList reports whether one of the CRLs lists serial.
func crlsList(crls [][]byte, serial *big.Int) bool {
	for _, der := range crls {
		l, err := x509.ParseRevocationList(der)
		if err != nil {
			continue
		}
		for _, e := range l.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(serial) == 0 {
				return true
			}
		}
	}
	return false
}

// fanout changes the bundle through the admin API and waits for every
// ready agent's stream to deliver the new version.
func (r *agentsRun) fanout(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent, tick *time.Ticker, progress func(string)) (*FanoutResult, error) {
	fr := &FanoutResult{Trigger: r.cfg.Fanout}
	for _, a := range agents {
		if a.isReady() {
			fr.Targets++
		}
	}
	var call func() error
	switch r.cfg.Fanout {
	case FanoutRevoke:
		// One of the run's own SVIDs: the first agent's, its first entry.
		var serialHex string
		for _, a := range agents {
			if a.isReady() && len(a.entries) > 0 {
				serialHex = a.serials[a.entries[0]]
				break
			}
		}
		serial, ok := new(big.Int).SetString(serialHex, 16)
		if !ok {
			return nil, fmt.Errorf("fan-out: no SVID of this run to revoke")
		}
		fr.Serial = serialHex
		r.fanSerial.Store(serial)
		call = func() error {
			_, err := admin.Revoke(ctx, &adminv1.RevokeRequest{Serial: serialHex})
			if err != nil {
				return fmt.Errorf("Revoke %s: %w", serialHex, err)
			}
			return nil
		}
	case FanoutPrepare:
		// Only one CA can be prepared at a time: one left by a previous
		// run is activated first (that changes no bundle), so the prepare
		// below is the change measured.
		cas, err := admin.ListCAs(ctx, &adminv1.ListCAsRequest{})
		if err != nil {
			return nil, fmt.Errorf("ListCAs: %w", err)
		}
		for _, c := range cas.GetCas() {
			if c.GetState() == "prepared" {
				if _, err := admin.ActivateCA(ctx, &adminv1.ActivateCARequest{Force: true}); err != nil {
					return nil, fmt.Errorf("ActivateCA (to make room for the measured prepare): %w", err)
				}
			}
		}
		call = func() error {
			if _, err := admin.PrepareCA(ctx, &adminv1.PrepareCARequest{}); err != nil {
				return fmt.Errorf("PrepareCA: %w", err)
			}
			return nil
		}
	}
	progress(fmt.Sprintf("fan-out (%s): a new bundle to %d agents", r.cfg.Fanout, fr.Targets))
	start := time.Now()
	r.fanStart.Store(start.UnixNano())
	err := call()
	ret := time.Now()
	fr.Call = ret.Sub(start)
	if err != nil {
		return nil, err
	}
	deadline := time.NewTimer(r.cfg.Timeout)
	defer deadline.Stop()
	for got := 0; got < fr.Targets; {
		select {
		case <-r.fanArrived:
			got++
		case <-tick.C:
			progress(fmt.Sprintf("fan-out: %d/%d agents have the new bundle", got, fr.Targets))
		case <-deadline.C:
			r.fail("fan-out: only %d of %d agents got the new bundle within %s", got, fr.Targets, r.cfg.Timeout)
			got = fr.Targets
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	var fromRet, fromStart []time.Duration
	for _, a := range agents {
		a.mu.Lock()
		if !a.fanAt.IsZero() {
			fromStart = append(fromStart, a.fanAt.Sub(start))
			fromRet = append(fromRet, max(0, a.fanAt.Sub(ret)))
			fr.Got++
			if a.fanChecked {
				fr.Checked++
			}
		}
		a.mu.Unlock()
	}
	if fr.Checked < fr.Got {
		r.fail("fan-out: %d of %d new bundles do not carry the change", fr.Got-fr.Checked, fr.Got)
	}
	fr.FromReturn, fr.FromStart = summarize(fromRet), summarize(fromStart)
	return fr, nil
}

// nodeCert checks the node SVID (for key, naming id) and makes it the
// client certificate.
func nodeCert(key crypto.Signer, chain [][]byte, id spiffeid.ID) (*tls.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("attest: empty node SVID")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("node SVID: %w", err)
	}
	got, err := x509svid.IDFromCert(leaf)
	if err != nil || got != id {
		return nil, fmt.Errorf("node SVID names %s (%v), not %s", got, err, id)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("node SVID is not for the node key")
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// checkSVID checks an issued SVID (for key, naming spiffeID) and returns
// its serial, hex.
func checkSVID(chain [][]byte, key crypto.Signer, spiffeID string) (string, error) {
	if len(chain) == 0 {
		return "", errors.New("empty SVID chain")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return "", fmt.Errorf("SVID: %w", err)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || id.String() != spiffeID {
		return "", fmt.Errorf("SVID names %s (%v), not %s", id, err, spiffeID)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return "", errors.New("SVID is not for the key its CSR carried")
	}
	return leaf.SerialNumber.Text(16), nil
}

// checkInventory confirms every SVID issued is in the server's inventory,
// recorded for the entry it was signed for; it returns how many were found.
func (r *agentsRun) checkInventory(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent) (int, error) {
	want := map[string]string{} // serial -> entry ID
	for _, a := range agents {
		for id, s := range a.serials {
			want[s] = id
		}
	}
	req := &adminv1.ListCertsRequest{IncludeExpired: true}
	found := 0
	for {
		resp, err := admin.ListCerts(ctx, req)
		if err != nil {
			return 0, fmt.Errorf("read inventory: %w", err)
		}
		for _, c := range resp.GetCerts() {
			s := new(big.Int)
			if _, ok := s.SetString(c.GetSerial(), 16); !ok {
				continue
			}
			key := s.Text(16)
			if eid, ok := want[key]; ok {
				if c.GetEntryId() != eid {
					return found, fmt.Errorf("inventory: serial %s is recorded for entry %q, signed for %s", key, c.GetEntryId(), eid)
				}
				found++
				delete(want, key)
			}
		}
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	if len(want) > 0 {
		return found, fmt.Errorf("%d issued serials are missing from the inventory", len(want))
	}
	return found, nil
}
