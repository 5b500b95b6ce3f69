package controlplane

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"slices"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/meshid/lifecycle"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// Bundle convergence and the gate of automatic CA activation.
//
// Every agent reports, per bundle version, how many of its callers'
// streams hold it (SDS: ACKed; Workload API: sent). "The streams hold the
// prepared CA" means they hold a bundle version that contains it. Bundle
// versions are content digests and cannot be ordered, and the newest one
// changes with every CRL too, so comparing with the version current when
// the CA was prepared would be wrong both ways (a later CRL push would
// count as not holding it; nothing says an older version did). Instead the
// server remembers, for each bundle version it has sent an agent, which
// CAs it contains (bundleCAs, bounded: a version forgotten counts as not
// holding, which only holds activation back longer). A version an agent
// reports from before a server restart is unknown too, until its proxies
// take the snapshot the agent gets on reconnecting.
//
// An agent that has not reported yet counts no streams: it got the newest
// bundle in its first snapshot, and reports within a second. An agent
// counts its last report (ReportBundles, agentreport.go) once, however
// many Sync streams it holds here; when its last one ends it stops
// counting. Each replica counts the agents
// connected to it; only the leader gates.

// maxBundleVersions bounds the versions remembered.
const maxBundleVersions = 256

// bundleCAs maps bundle versions to the CAs they contain.
type bundleCAs struct {
	mu    sync.Mutex
	cas   map[string]map[[32]byte]bool
	order []string
}

// note records what version v contains.
func (b *bundleCAs) note(v *agentv1.Bundle) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.cas[v.GetVersion()]; ok {
		return
	}
	if b.cas == nil {
		b.cas = map[string]map[[32]byte]bool{}
	}
	set := map[[32]byte]bool{}
	for _, der := range v.GetX509Authorities() {
		set[sha256.Sum256(der)] = true
	}
	b.cas[v.GetVersion()] = set
	b.order = append(b.order, v.GetVersion())
	if len(b.order) > maxBundleVersions {
		delete(b.cas, b.order[0])
		b.order = slices.Delete(b.order, 0, 1)
	}
}

// contains reports whether version v is known to contain the CA whose
// certificate hashes to h.
func (b *bundleCAs) contains(v string, h [32]byte) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cas[v][h]
}

// agentConvergence is one agent's streams, as its last report says.
type agentConvergence struct {
	id                         string
	reported                   bool
	streams, newest, preparedN int
}

// convergence sums the connected agents' reports: per agent, its streams,
// those on version newest and those on a version containing prepared (nil:
// none).
func (s *Server) convergence(newest string, prepared *x509.Certificate) []agentConvergence {
	var h [32]byte
	if prepared != nil {
		h = sha256.Sum256(prepared.Raw)
	}
	reports := s.agents.reports()
	out := make([]agentConvergence, 0, len(reports))
	for _, ar := range reports {
		a := agentConvergence{id: ar.id}
		if r := ar.r; r != nil {
			a.reported = true
			a.streams = r.streams
			var onNewest, onPrepared int
			for _, vc := range r.byVersion {
				if vc.version == newest {
					onNewest += vc.n
				}
				if prepared != nil && s.agents.versions.contains(vc.version, h) {
					onPrepared += vc.n
				}
			}
			// parseBundleReport refuses more held than open; min keeps
			// the ratio at most 1 all the same.
			a.newest = min(onNewest, r.streams)
			a.preparedN = min(onPrepared, r.streams)
		}
		out = append(out, a)
	}
	return out
}

// newestBundle is the version of the X.509 bundle last published.
func (s *Server) newestBundle() string {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	if s.lastX509 == nil {
		return ""
	}
	return s.lastX509.Version
}

// minConvergence is the configured gate: 0 in the Config means the
// default 1.0; a negative value turns the gate off.
func (s *Server) minConvergence() float64 {
	switch m := s.cfg.CAActivateMinConvergence; {
	case m == 0:
		return 1
	case m < 0:
		return 0
	default:
		return min(m, 1)
	}
}

// gateState is the convergence gate of the prepared CA's activation, now.
type gateState struct {
	// due: automatic activation is due by time (Policy.Due).
	due              bool
	gate             lifecycle.Gate
	conv             lifecycle.Convergence
	min              float64
	active, prepared lifecycle.CA
	preparedID       string
	preparedRoot     *x509.Certificate
}

// reason is what `meshid ca show` says while the gate holds.
func (g gateState) reason(p lifecycle.Policy, s *Server) string {
	if !g.due || !g.gate.Held() {
		return ""
	}
	return p.HeldReason(s.now(), g.active, g.prepared, g.conv, g.min, g.gate)
}

// activationGate decides the gate at now. It takes s.mu: never call it
// with s.mu held.
func (s *Server) activationGate() gateState {
	var g gateState
	var active, prepared *lifecycle.CA
	s.mu.RLock()
	for _, v := range s.cas {
		c := v.lc()
		switch {
		case v.rec.ID == s.activeID:
			active = &c
		case v.rec.State == store.CAPrepared:
			prepared = &c
			g.preparedID, g.preparedRoot = v.rec.ID, v.root
		}
	}
	s.mu.RUnlock()
	if active == nil || prepared == nil {
		return g
	}
	g.active, g.prepared, g.min = *active, *prepared, s.minConvergence()
	now := s.now()
	p := s.policy()
	g.due = p.Due(now, active, prepared) == lifecycle.Activate
	if !g.due {
		return g
	}
	if g.min > 0 {
		for _, a := range s.convergence("", g.preparedRoot) {
			g.conv.Streams += a.streams
			g.conv.Holding += a.preparedN
		}
		streams, holding := s.peerConvergence(g.preparedID)
		g.conv.Streams += streams
		g.conv.Holding += holding
	}
	g.gate = p.GateAt(now, *active, *prepared, g.conv, g.min)
	return g
}

// gatedActivation is rotationTick's hook for a due activation: it reports
// whether to activate now. Held, it logs why (once per tick) and the
// timer is re-armed for the gate's next moment by scheduleRotation;
// convergence changes re-run the tick (convergenceChanged).
func (s *Server) gatedActivation() bool {
	g := s.activationGate()
	s.agents.gateHeld.Store(g.gate.Held())
	switch {
	case g.gate == lifecycle.GateForced:
		s.log.Error("activating the prepared CA without bundle convergence: its last-resort time has passed and the active CA must not expire",
			"prepared", g.preparedID, "holding", g.conv.Holding, "streams", g.conv.Streams, "min", g.min,
			"active_not_after", g.active.NotAfter)
		return true
	case g.gate.Held():
		s.log.Warn(g.reason(s.policy(), s), "prepared", g.preparedID)
		return false
	}
	return true
}

// activationHeld says whether the automatic activation is due and held;
// scheduleRotation then waits for the gate's next moment instead of the
// past activation time.
func (s *Server) activationHeld() bool {
	if s.cfg.DisableAutoRotate || !s.Leading() {
		return false
	}
	g := s.activationGate()
	return g.due && g.gate.Held()
}

// convergenceChanged re-runs the lifecycle tick at once if an activation
// the tick held may now proceed (an agent's report changed, or it left).
// Only a held one: a due activation that failed keeps its retry backoff.
func (s *Server) convergenceChanged() {
	if !s.agents.gateHeld.Load() || s.cfg.DisableAutoRotate || !s.Leading() {
		return
	}
	if g := s.activationGate(); g.due && !g.gate.Held() && s.agents.gateHeld.CompareAndSwap(true, false) {
		s.rotTimer.reset(0)
	}
}

// heldReasonFor is the activation_held text of CA id (the prepared one).
func (s *Server) heldReasonFor(id string) string {
	if s.cfg.DisableAutoRotate || !s.Leading() {
		return ""
	}
	g := s.activationGate()
	if g.preparedID != id {
		return ""
	}
	return g.reason(s.policy(), s)
}

// convergenceCollector exports meshid_bundle_convergence_ratio and
// meshid_ca_activation_held, computed at scrape time.
type convergenceCollector struct {
	s                     *Server
	ratio, held, deadline *prometheus.Desc
}

func newConvergenceCollector(s *Server) *convergenceCollector {
	return &convergenceCollector{s: s,
		ratio: prometheus.NewDesc("meshid_bundle_convergence_ratio",
			"Of the connected node agents' streams that carry the trust bundle (SDS: ACKed; Workload API: sent), the fraction holding the newest bundle; 1 with none.", nil, nil),
		held: prometheus.NewDesc("meshid_ca_activation_held",
			"1 while automatic activation of the prepared CA is due but held back because too few agent streams hold it (--ca-activate-min-convergence).", nil, nil),
		deadline: prometheus.NewDesc("meshid_ca_activation_deadline_timestamp_seconds",
			"While activation is held: when it is reported as unable to converge (the alert goes critical); 0 otherwise.", nil, nil),
	}
}

func (c *convergenceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.ratio
	ch <- c.held
	ch <- c.deadline
}

func (c *convergenceCollector) Collect(ch chan<- prometheus.Metric) {
	var streams, newest int
	for _, a := range c.s.convergence(c.s.newestBundle(), nil) {
		streams += a.streams
		newest += a.newest
	}
	ch <- prometheus.MustNewConstMetric(c.ratio, prometheus.GaugeValue, lifecycle.Convergence{Holding: newest, Streams: streams}.Ratio())
	held, deadline := 0.0, 0.0
	if !c.s.cfg.DisableAutoRotate && c.s.Leading() {
		if g := c.s.activationGate(); g.due && g.gate.Held() {
			held = 1
			deadline = float64(c.s.policy().Deadline(g.active, g.prepared).Unix())
		}
	}
	ch <- prometheus.MustNewConstMetric(c.held, prometheus.GaugeValue, held)
	ch <- prometheus.MustNewConstMetric(c.deadline, prometheus.GaugeValue, deadline)
}

// Status implements adminv1.AdminServiceServer.
func (a *AdminService) Status(ctx context.Context, _ *adminv1.StatusRequest) (*adminv1.StatusResponse, error) {
	s := a.srv
	resp := &adminv1.StatusResponse{BundleVersion: s.newestBundle(), Store: s.storeStatus(ctx)}
	var root *x509.Certificate
	if p := s.preparedCA(); p != nil {
		resp.PreparedCa, root = p.rec.ID, p.root
		resp.ActivationHeld = s.heldReasonFor(p.rec.ID)
	}
	self, peers := s.peerAgents()
	for _, c := range s.convergence(resp.BundleVersion, root) {
		resp.Agents = append(resp.Agents, &adminv1.AgentStatus{Id: c.id, Streams: int32(c.streams), StreamsNewest: int32(c.newest),
			StreamsPrepared: int32(c.preparedN), Reported: c.reported, Replica: self})
		resp.Streams += int32(c.streams)
		resp.StreamsNewest += int32(c.newest)
		resp.StreamsPrepared += int32(c.preparedN)
	}
	// The peers' agents, as each replica last published them (within
	// peerInterval): a status on any replica covers the whole mesh.
	for id, p := range peers {
		for _, a := range p.Agents {
			prep := int32(0)
			if p.PreparedCA == resp.PreparedCa {
				prep = int32(a.Prepared)
			}
			resp.Agents = append(resp.Agents, &adminv1.AgentStatus{Id: a.ID, Streams: int32(a.Streams), StreamsNewest: int32(a.Newest),
				StreamsPrepared: prep, Reported: a.Reported, Replica: id})
		}
		resp.Streams += int32(p.Streams)
		resp.StreamsNewest += int32(p.Newest)
		if p.PreparedCA == resp.PreparedCa {
			resp.StreamsPrepared += int32(p.Prepared)
		}
	}
	slices.SortFunc(resp.Agents, func(x, y *adminv1.AgentStatus) int {
		if c := strings.Compare(x.Id, y.Id); c != 0 {
			return c
		}
		return strings.Compare(x.Replica, y.Replica)
	})
	resp.ConvergenceRatio = lifecycle.Convergence{Holding: int(resp.StreamsNewest), Streams: int(resp.Streams)}.Ratio()
	return resp, nil
}
