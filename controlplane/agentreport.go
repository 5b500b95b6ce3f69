package controlplane

import (
	"context"
	"slices"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
)

// Convergence reports (ReportBundles). An agent reports, per bundle
// version, how many of its callers' streams hold it. Reports used to
// arrive on the Sync stream itself, which made Sync bidirectional and cost
// every agent a receive goroutine (and its stack) on the server for a
// message sent a few times a day; they are a unary call now, applied to
// the calling agent's open Sync streams on this server and kept only as
// long as one is open.

// Bounds of one report: a proxy holds one bundle version at a time, and
// the server remembers maxBundleVersions of them, so an honest agent's
// callers are on a handful; versions are digests (bundleVersion).
const (
	maxReportVersions = 64
	maxVersionLen     = 128
)

// agentSessions is one agent's Sync streams on this server: how many are
// open and the last report it sent while one was (nil: none yet).
type agentSessions struct {
	n      int
	report *bundleReport
}

// bundleReport is a checked BundleReport: streams open on the agent's
// workload socket, and how many hold each version (adding up to at most
// streams). Immutable once made: readers share it.
type bundleReport struct {
	streams   int
	byVersion []versionCount
}

type versionCount struct {
	version string
	n       int
}

// parseBundleReport checks r: counts not negative, at most
// maxReportVersions non-empty versions of at most maxVersionLen bytes,
// holding no more than streams in all.
func parseBundleReport(r *agentv1.BundleReport) (*bundleReport, error) {
	if r == nil {
		return nil, status.Error(codes.InvalidArgument, "report is required")
	}
	if r.GetStreams() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "report: streams %d is negative", r.GetStreams())
	}
	if n := len(r.GetStreamsByVersion()); n > maxReportVersions {
		return nil, status.Errorf(codes.InvalidArgument, "report: %d versions, at most %d", n, maxReportVersions)
	}
	out := &bundleReport{streams: int(r.GetStreams()), byVersion: make([]versionCount, 0, len(r.GetStreamsByVersion()))}
	held := 0
	for v, n := range r.GetStreamsByVersion() {
		switch {
		case v == "" || len(v) > maxVersionLen:
			return nil, status.Errorf(codes.InvalidArgument, "report: a version must be 1 to %d bytes", maxVersionLen)
		case n < 0:
			return nil, status.Errorf(codes.InvalidArgument, "report: version %q has a negative count", v)
		}
		held += int(n)
		out.byVersion = append(out.byVersion, versionCount{version: strings.Clone(v), n: int(n)})
	}
	if held > out.streams {
		return nil, status.Errorf(codes.InvalidArgument, "report: %d streams hold a version but only %d are open", held, out.streams)
	}
	slices.SortFunc(out.byVersion, func(a, b versionCount) int { return strings.Compare(a.version, b.version) })
	return out, nil
}

// setReport makes r agent id's report, if it has a Sync stream open here.
func (h *agentHub) setReport(id string, r *bundleReport) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	sess := h.byAgent[id]
	if sess == nil {
		return false
	}
	sess.report = r
	return true
}

// agentReport is one connected agent's report (nil: none yet).
type agentReport struct {
	id string
	r  *bundleReport
}

// reports lists the agents with a Sync stream open here, by ID.
func (h *agentHub) reports() []agentReport {
	h.mu.Lock()
	out := make([]agentReport, 0, len(h.byAgent))
	for id, sess := range h.byAgent {
		out = append(out, agentReport{id: id, r: sess.report})
	}
	h.mu.Unlock()
	slices.SortFunc(out, func(a, b agentReport) int { return strings.Compare(a.id, b.id) })
	return out
}

// ReportBundles implements agentv1.AgentServiceServer. The caller is the
// node SVID's agent, as for Sync; its rate is bounded before its report
// is looked at.
func (a *AgentService) ReportBundles(ctx context.Context, req *agentv1.ReportBundlesRequest) (*agentv1.ReportBundlesResponse, error) {
	id, err := a.agentCaller(ctx)
	if err != nil {
		return nil, err
	}
	if err := a.srv.agentLim.allowReport(id.String()); err != nil {
		return nil, err
	}
	r, err := parseBundleReport(req.GetReport())
	if err != nil {
		return nil, err
	}
	if !a.srv.agents.setReport(id.String(), r) {
		return nil, status.Errorf(codes.FailedPrecondition, "agent %s has no Sync stream open on this server: open one, then report", id)
	}
	a.srv.reportChanged()
	return &agentv1.ReportBundlesResponse{}, nil
}
