package bench_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/bench"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// agentPlane is a real server with its agent API on loopback, as
// agent/agent_test.go's startPlane; it returns the agent address, an admin
// client, the admin socket and the metrics URL.
func agentPlane(t *testing.T) (addr string, admin adminv1.AdminServiceClient, adminSock, metrics string) {
	t.Helper()
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-bench-agents-")
	if err != nil {
		t.Fatal(err)
	}
	ep := controlplane.Endpoints{AdminSocket: filepath.Join(dir, "a.sock"), AgentListen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0"}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan controlplane.Listening, 1)
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, ep, func(l controlplane.Listening) { ready <- l }) }()
	var l controlplane.Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("unix://"+ep.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", ep.AdminSocket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	})
	return l.AgentAddr, adminv1.NewAdminServiceClient(cc), ep.AdminSocket, "http://" + l.MetricsAddr + "/metrics"
}

// listAll reads every entry and every inventory row through the admin API.
func listAll(t *testing.T, admin adminv1.AdminServiceClient) ([]*adminv1.Entry, []*adminv1.IssuedCert) {
	t.Helper()
	ctx := context.Background()
	var entries []*adminv1.Entry
	for req := (&adminv1.ListEntriesRequest{}); ; {
		resp, err := admin.ListEntries(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, resp.GetEntries()...)
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	var certs []*adminv1.IssuedCert
	for req := (&adminv1.ListCertsRequest{IncludeExpired: true}); ; {
		resp, err := admin.ListCerts(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, resp.GetCerts()...)
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	return entries, certs
}

func normSerial(s string) string { return strings.TrimLeft(strings.ToLower(s), "0") }

// TestAgentsPerAgentParents runs the node-agent load with an entry set per
// agent and checks its counts against the server's own records.
func TestAgentsPerAgentParents(t *testing.T) {
	addr, admin, adminSock, metrics := agentPlane(t)
	const n, w = 5, 3
	// An entry without a parent already on the server: every agent is sent
	// it, the bench must count it as foreign and not sign it.
	if _, err := admin.CreateEntry(context.Background(), &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: "spiffe://cluster.local/ns/other/sa/x",
		Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:4242"}}}}); err != nil {
		t.Fatal(err)
	}
	res, err := bench.Agents(context.Background(), bench.AgentsConfig{
		Server: addr, AdminSocket: adminSock, MetricsURL: metrics, Agents: n, Workloads: w,
		Concurrency: 2, VerifyInventory: true, Timeout: time.Minute,
		Progress: func(line string) { t.Log(line) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v cold %+v fanout %+v metrics %+v", res, res.ColdStart, res.Fanout, res.Metrics)
	if res.Errors != 0 {
		t.Fatalf("%d errors: %s", res.Errors, res.FirstError)
	}
	cs := res.ColdStart
	if cs.Attested != n || cs.Synced != n || cs.Ready != n || cs.SVIDs != n*w || res.Entries != n*w || res.InventoryChecked != n*w {
		t.Fatalf("cold start %+v, entries %d, inventory %d: want %d agents and %d SVIDs", cs, res.Entries, res.InventoryChecked, n, n*w)
	}
	if res.ForeignEntries != n {
		t.Fatalf("foreign entries %d, want %d (the one unparented entry, to every agent)", res.ForeignEntries, n)
	}

	// The server's records: W entries with each agent as parent, exactly
	// those sent to it, and an inventory row for each SVID, for its entry.
	entries, certs := listAll(t, admin)
	byParent := map[string][]string{}
	for _, e := range entries {
		if e.GetParentId() != "" {
			byParent[e.GetParentId()] = append(byParent[e.GetParentId()], e.GetId())
		}
	}
	rowsByEntry := map[string][]string{}
	for _, c := range certs {
		rowsByEntry[c.GetEntryId()] = append(rowsByEntry[c.GetEntryId()], normSerial(c.GetSerial()))
	}
	if len(res.Details) != n {
		t.Fatalf("%d agent details", len(res.Details))
	}
	rows := 0
	versions := map[string]bool{}
	for _, d := range res.Details {
		want := slices.Sorted(slices.Values(byParent[d.SpiffeID]))
		got := slices.Sorted(slices.Values(d.Entries))
		if len(want) != w || !slices.Equal(got, want) {
			t.Fatalf("agent %s was sent %v; the server has %v with it as parent (want %d)", d.SpiffeID, got, want, w)
		}
		for _, eid := range want {
			r := rowsByEntry[eid]
			if len(r) != 1 || r[0] != normSerial(d.Serials[eid]) {
				t.Fatalf("entry %s: inventory rows %v, the agent was issued %s", eid, r, d.Serials[eid])
			}
			rows++
		}
		versions[d.FanoutVersion] = true
	}
	if rows != n*w {
		t.Fatalf("%d inventory rows for the run's entries, want %d", rows, n*w)
	}

	// The fan-out (a revocation) reached every agent, each with the same
	// new bundle whose CRL lists the revoked serial.
	f := res.Fanout
	if f == nil || f.Trigger != bench.FanoutRevoke || f.Targets != n || f.Got != n || f.Checked != n || f.FromStart.Count != n || f.Serial == "" {
		t.Fatalf("fan-out %+v", f)
	}
	if len(versions) != 1 || versions[""] {
		t.Fatalf("fan-out bundle versions %v, want one for all", versions)
	}
	if m := res.Metrics; m == nil || m.Up.RSSBytes <= 0 || m.End.RSSBytes <= 0 {
		t.Fatalf("metrics %+v", res.Metrics)
	}

	// Every agent attested once and is recorded; none holds a stream any
	// longer (the run closed them).
	ag, err := admin.ListAgents(context.Background(), &adminv1.ListAgentsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	mine := 0
	for _, a := range ag.GetAgents() {
		if strings.HasPrefix(a.GetNode(), res.NodePrefix+"-") {
			mine++
		}
	}
	if mine != n {
		t.Fatalf("%d agents recorded for prefix %s, want %d", mine, res.NodePrefix, n)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ag, err := admin.ListAgents(context.Background(), &adminv1.ListAgentsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		open := 0
		for _, a := range ag.GetAgents() {
			open += int(a.GetStreams())
		}
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d Sync streams still open after the run", open)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentsShared runs the load with entries every agent may serve and a
// prepared CA as the bundle change.
func TestAgentsShared(t *testing.T) {
	addr, admin, adminSock, _ := agentPlane(t)
	const n, w = 3, 2
	res, err := bench.Agents(context.Background(), bench.AgentsConfig{
		Server: addr, AdminSocket: adminSock, Agents: n, Workloads: w, Shared: true,
		Fanout: bench.FanoutPrepare, KeygenInline: true, VerifyInventory: true, Timeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 0 || res.ColdStart.Ready != n || res.ColdStart.SVIDs != n*w || res.Entries != w || res.ForeignEntries != 0 {
		t.Fatalf("%+v cold %+v", res, res.ColdStart)
	}
	entries, certs := listAll(t, admin)
	var shared []string
	for _, e := range entries {
		if strings.Contains(e.GetSpiffeId(), res.NodePrefix+"-shared-") {
			if e.GetParentId() != "" {
				t.Fatalf("shared entry %s has parent %s", e.GetId(), e.GetParentId())
			}
			shared = append(shared, e.GetId())
		}
	}
	slices.Sort(shared)
	rows := 0
	for _, c := range certs {
		if slices.Contains(shared, c.GetEntryId()) {
			rows++
		}
	}
	if len(shared) != w || rows != n*w {
		t.Fatalf("%d shared entries, %d inventory rows for them; want %d and %d", len(shared), rows, w, n*w)
	}
	for _, d := range res.Details {
		if got := slices.Sorted(slices.Values(d.Entries)); !slices.Equal(got, shared) {
			t.Fatalf("agent %s was sent %v, want %v", d.SpiffeID, got, shared)
		}
	}
	if f := res.Fanout; f == nil || f.Targets != n || f.Got != n || f.Checked != n {
		t.Fatalf("fan-out %+v", res.Fanout)
	}
	cas, err := admin.ListCAs(context.Background(), &adminv1.ListCAsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(cas.GetCas(), func(c *adminv1.CA) bool { return c.GetState() == "prepared" }) {
		t.Fatalf("no prepared CA after the prepare fan-out: %v", cas.GetCas())
	}
}

func TestAgentsBadConfig(t *testing.T) {
	for _, cfg := range []bench.AgentsConfig{
		{Server: "127.0.0.1:1", AdminSocket: "/nonexistent", Agents: 0, Workloads: 1},
		{Server: "127.0.0.1:1", AdminSocket: "/nonexistent", Agents: 1, Workloads: 1, Fanout: "rotate"},
		{AdminSocket: "/nonexistent", Agents: 1, Workloads: 1},
	} {
		if _, err := bench.Agents(context.Background(), cfg); err == nil {
			t.Fatalf("%+v: no error", cfg)
		}
	}
}
