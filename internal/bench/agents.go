package bench

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
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
