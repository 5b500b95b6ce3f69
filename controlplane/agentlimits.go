package controlplane

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Limits on what one caller of the agent API can make the server do. Attest
// is open to anyone who reaches the port, and each call checks a CSR
// signature before it can know the token is bad; an attested agent may sign
// many SVIDs (each one a row in the inventory, on disk for the retention) and
// report often. None of that may let one caller starve the server or fill
// its disk.
const (
	// attestRate/attestBurst bound attestations, good or bad, across all
	// callers: 1,000 nodes joining at once still pass in about a second.
	attestRate  = 1000
	attestBurst = 1000
	// signRate/signBurst bound the SVIDs one agent has signed: a burst
	// covers a node's whole set after a reconnect (MaxSignBatch twice), the
	// rate far more renewals than a node needs.
	signRate  = 100
	signBurst = 2 * MaxSignBatch
	// reportCoalesce is how often, at most, reports re-evaluate a held
	// activation (each evaluation visits every connected agent).
	reportCoalesce = 100 * time.Millisecond
	// reportRate/reportBurst bound one agent's ReportBundles calls: it
	// sends at most one a second (agent/report.go) and one more on each
	// new Sync stream, so a burst covers a few reconnects and a flood is
	// refused before its report is looked at.
	reportRate  = 2
	reportBurst = 8
)

// agentLimits holds the agent API's rate limits.
type agentLimits struct {
	attest *rate.Limiter

	mu   sync.Mutex
	sign map[string]*rate.Limiter // by agent ID
	// signRate and signBurst are the per-agent bucket (tests lower them).
	signRate  rate.Limit
	signBurst int

	report map[string]*rate.Limiter // by agent ID; guarded by mu

	reportPending atomic.Bool
}

// newAgentLimits makes the limits; signPerSec is Config.AgentSignRate
// (0: signRate; negative: no limit).
func newAgentLimits(signPerSec float64) *agentLimits {
	l := &agentLimits{attest: rate.NewLimiter(attestRate, attestBurst), sign: map[string]*rate.Limiter{},
		report: map[string]*rate.Limiter{}, signRate: signRate, signBurst: signBurst}
	switch {
	case signPerSec < 0:
		l.signRate = rate.Inf
	case signPerSec > 0:
		l.signRate = rate.Limit(signPerSec)
		l.signBurst = max(signBurst, int(2*signPerSec))
	}
	return l
}

func (l *agentLimits) allowAttest() error {
	if !l.attest.Allow() {
		return status.Error(codes.ResourceExhausted, "too many attestations: retry shortly")
	}
	return nil
}

// allowSign takes n signatures from agent's bucket, all or none.
func (l *agentLimits) allowSign(agent string, n int) error {
	l.mu.Lock()
	lim, ok := l.sign[agent]
	if !ok {
		lim = rate.NewLimiter(l.signRate, l.signBurst)
		l.sign[agent] = lim
	}
	l.mu.Unlock()
	if !lim.AllowN(time.Now(), n) {
		return status.Errorf(codes.ResourceExhausted, "agent %s asked for %d signatures, over its rate (%v/s, burst %d): retry later", agent, n, l.signRate, l.signBurst)
	}
	return nil
}

// allowReport takes one report from agent's bucket.
func (l *agentLimits) allowReport(agent string) error {
	l.mu.Lock()
	lim, ok := l.report[agent]
	if !ok {
		lim = rate.NewLimiter(reportRate, reportBurst)
		l.report[agent] = lim
	}
	l.mu.Unlock()
	if !lim.Allow() {
		return status.Errorf(codes.ResourceExhausted, "agent %s reports more often than %d/s (burst %d): report when the counts change", agent, reportRate, reportBurst)
	}
	return nil
}

// reportChanged coalesces reports: the first in a window schedules one
// evaluation at its end, later ones in the window ride on it, so a flood
// of reports costs one pass over the agents per window, and the last
// report is never lost.
func (s *Server) reportChanged() {
	l := s.agentLim
	if !l.reportPending.CompareAndSwap(false, true) {
		return
	}
	time.AfterFunc(reportCoalesce, func() { // rate control, not expiry: wall time
		l.reportPending.Store(false)
		if !s.tasks.enter() {
			return
		}
		defer s.tasks.leave()
		s.convergenceChanged()
	})
}
