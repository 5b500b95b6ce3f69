package controlplane

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
)

// report is a BundleReport of streams, n of them on version v.
func report(streams int32, v string, n int32) *agentv1.ReportBundlesRequest {
	r := &agentv1.BundleReport{Streams: streams, StreamsByVersion: map[string]int32{}}
	if v != "" {
		r.StreamsByVersion[v] = n
	}
	return &agentv1.ReportBundlesRequest{Report: r}
}

// convergenceOf is agent id's row in s.convergence (ok false: none).
func convergenceOf(s *Server, id, newest string) (agentConvergence, bool) {
	for _, c := range s.convergence(newest, nil) {
		if c.id == id {
			return c, true
		}
	}
	return agentConvergence{}, false
}

// waitNoStreams waits until agent id has no Sync stream open on s.
func waitNoStreams(t *testing.T, s *Server, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.agents.streamsOf(id) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("agent %s still holds %d Sync streams", id, s.agents.streamsOf(id))
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
	}
}

// TestReportNeedsSync: a report from an agent with no Sync stream open
// here is refused (FailedPrecondition) and counts nothing; one sent while
// a stream is open counts until the stream ends, and a report after that
// is refused again.
func TestReportNeedsSync(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	cert, id := a.attest(t, agentToken(t, a.srv, "n1"))
	c := a.dial(t, cert)
	v := a.srv.newestBundle()

	_, err := c.ReportBundles(ctx, report(3, v, 3))
	wantCode(t, "a report before any Sync", err, codes.FailedPrecondition)
	if got, ok := convergenceOf(a.srv, id.String(), v); ok {
		t.Fatalf("refused report counted: %+v", got)
	}

	sctx, scancel := context.WithCancel(ctx)
	openSync(t, sctx, c)
	if got, ok := convergenceOf(a.srv, id.String(), v); !ok || got.reported || got.streams != 0 {
		t.Fatalf("before its report: %+v, %v; want connected, not reported", got, ok)
	}
	if _, err := c.ReportBundles(ctx, report(3, v, 2)); err != nil {
		t.Fatal(err)
	}
	if got, _ := convergenceOf(a.srv, id.String(), v); !got.reported || got.streams != 3 || got.newest != 2 {
		t.Fatalf("after its report: %+v; want 3 streams, 2 on the newest bundle", got)
	}

	scancel()
	waitNoStreams(t, a.srv, id.String())
	if got, ok := convergenceOf(a.srv, id.String(), v); ok {
		t.Fatalf("the stream ended but its counts remain: %+v", got)
	}
	_, err = c.ReportBundles(ctx, report(1, v, 1))
	wantCode(t, "a report after the stream ended", err, codes.FailedPrecondition)
	if got, ok := convergenceOf(a.srv, id.String(), v); ok {
		t.Fatalf("refused report counted: %+v", got)
	}

	// A new stream starts unreported: the old report does not come back.
	openSync(t, ctx, c)
	if got, _ := convergenceOf(a.srv, id.String(), v); got.reported {
		t.Fatalf("a new stream has the old stream's report: %+v", got)
	}
}

// TestReportIsTheCallersOwn: agent A's report changes A's counts only,
// whatever it says; B's stay as B reported.
func TestReportIsTheCallersOwn(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	certA, idA := a.attest(t, agentToken(t, a.srv, "node-a"))
	certB, idB := a.attest(t, agentToken(t, a.srv, "node-b"))
	ca, cb := a.dial(t, certA), a.dial(t, certB)
	openSync(t, ctx, ca)
	openSync(t, ctx, cb)
	v := a.srv.newestBundle()

	if _, err := cb.ReportBundles(ctx, report(1, "", 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ReportBundles(ctx, report(5, v, 5)); err != nil {
		t.Fatal(err)
	}
	gotA, _ := convergenceOf(a.srv, idA.String(), v)
	gotB, _ := convergenceOf(a.srv, idB.String(), v)
	if gotA.streams != 5 || gotA.newest != 5 {
		t.Fatalf("A: %+v, want 5 streams on the newest", gotA)
	}
	if !gotB.reported || gotB.streams != 1 || gotB.newest != 0 {
		t.Fatalf("B after A's report: %+v, want B's own report (1 stream, 0 on the newest)", gotB)
	}
	st, err := NewAdminService(a.srv).Status(ctx, &adminv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetStreams() != 6 || st.GetStreamsNewest() != 5 || len(st.GetAgents()) != 2 {
		t.Fatalf("status %v: want 6 streams, 5 on the newest, two agents", st)
	}
}

// TestReportBounded: malformed reports are InvalidArgument, a flood from
// one agent ResourceExhausted, and neither changes the counts the last
// good report set.
func TestReportBounded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	cert, id := a.attest(t, agentToken(t, a.srv, "n1"))
	c := a.dial(t, cert)
	openSync(t, ctx, c)
	v := a.srv.newestBundle()
	if _, err := c.ReportBundles(ctx, report(2, v, 2)); err != nil {
		t.Fatal(err)
	}
	many := &agentv1.BundleReport{Streams: 1000, StreamsByVersion: map[string]int32{}}
	for i := range maxReportVersions + 1 {
		many.StreamsByVersion[strings.Repeat("v", i+1)] = 1
	}
	for _, tc := range []struct {
		name string
		req  *agentv1.ReportBundlesRequest
	}{
		{"no report", &agentv1.ReportBundlesRequest{}},
		{"negative streams", report(-1, "", 0)},
		{"negative count", report(2, v, -1)},
		{"more held than open", report(1, v, 2)},
		{"an empty version", &agentv1.ReportBundlesRequest{Report: &agentv1.BundleReport{Streams: 2, StreamsByVersion: map[string]int32{"": 1}}}},
		{"a long version", report(2, strings.Repeat("x", maxVersionLen+1), 1)},
		{"too many versions", &agentv1.ReportBundlesRequest{Report: many}},
	} {
		_, err := c.ReportBundles(ctx, tc.req)
		wantCode(t, tc.name, err, codes.InvalidArgument)
	}
	// The burst is spent by now (1 + 7 calls); keep calling until refused.
	refused := false
	for range 2 * reportBurst {
		if _, err := c.ReportBundles(ctx, report(9, v, 9)); status.Code(err) == codes.ResourceExhausted {
			refused = true
			break
		}
	}
	if !refused {
		t.Fatalf("%d reports in a row were all taken; want ResourceExhausted past the burst of %d", 2*reportBurst, reportBurst)
	}
	got, _ := convergenceOf(a.srv, id.String(), v)
	if got.streams != 2 && got.streams != 9 {
		t.Fatalf("counts %+v: want the last report taken", got)
	}
}
