package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
)

// attestAgent attests node through the server's agent API handler, as
// the agent's first call does (the handshake is covered by controlplane's
// tests; Attest needs none).
func attestAgent(t *testing.T, srv *controlplane.Server, node string) string {
	t.Helper()
	ctx := context.Background()
	tok, _, err := srv.CreateAgentToken(ctx, node, time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := controlplane.NewAgentService(srv).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(tok), Csr: csr})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetAgentId()
}

type agentJSON struct {
	ID            string `json:"id"`
	Node          string `json:"node"`
	Method        string `json:"method"`
	Banned        bool   `json:"banned"`
	SVIDExpiresAt string `json:"svid_expires_at"`
}

// TestAgentCommands: list, show, ban, unban and evict against a real
// server on its admin socket; refused calls exit 1 with one line and
// change nothing.
func TestAgentCommands(t *testing.T) {
	srv, sock := cliServer(t)
	admin := "--admin-socket=" + sock
	id := attestAgent(t, srv, "web-1")

	listJSON := func() []agentJSON {
		t.Helper()
		out, errOut, code := run(t, "agent", "list", admin, "-o", "json")
		if code != 0 {
			t.Fatalf("list -o json: exit %d %s", code, errOut)
		}
		var got []agentJSON
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("list -o json: %v\n%s", err, out)
		}
		return got
	}
	got := listJSON()
	if len(got) != 1 || got[0].ID != id || got[0].Node != "web-1" || got[0].Method != "join_token" || got[0].Banned || got[0].SVIDExpiresAt == "" {
		t.Fatalf("list -o json = %+v, want the one agent %s, active, with its node SVID expiry", got, id)
	}
	out, errOut, code := run(t, "agent", "list", admin)
	if code != 0 || !strings.Contains(out, "SVID EXPIRES") || !strings.Contains(out, id) || !strings.Contains(out, "active") {
		t.Fatalf("list: exit %d %s\n%s", code, errOut, out)
	}
	out, errOut, code = run(t, "agent", "list", admin, "-o", "yaml")
	if code != 0 || !strings.Contains(out, "node: web-1") {
		t.Fatalf("list -o yaml: exit %d %s\n%s", code, errOut, out)
	}
	out, errOut, code = run(t, "agent", "show", "web-1", admin)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "STATE") || !strings.Contains(out, "active") {
		t.Fatalf("show by node name: exit %d %s\n%s", code, errOut, out)
	}

	before := listJSON()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"show", "nope"}, "no agent on node"},
		{[]string{"ban", "nope"}, "no agent on node"},
		{[]string{"evict", "spiffe://cluster.local/meshid/agent/join/nope"}, "not found"},
		{[]string{"unban", "web-1"}, "is not banned"},
		{[]string{"ban", "spiffe://cluster.local/ns/shop/sa/web"}, "not a node agent's SPIFFE ID"},
		{[]string{"show", "-o", "xml", "web-1"}, "unknown output format"},
		{[]string{"lsit"}, "unknown command"},
	} {
		args := append([]string{"agent"}, tc.args...)
		if tc.args[0] != "lsit" { // the agent command itself has no --admin-socket
			args = append(args, admin)
		}
		_, errOut, code := run(t, args...)
		if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("agent %v: exit %d, %q; want exit 1 and one line saying %q", tc.args, code, errOut, tc.want)
		}
	}
	if after := listJSON(); len(after) != len(before) || after[0] != before[0] {
		t.Fatalf("refused commands changed the agents: %+v, was %+v", after, before)
	}

	out, errOut, code = run(t, "agent", "ban", "web-1", admin)
	if code != 0 || !strings.Contains(out, "banned "+id+": 1 serial(s) on the CRLs") {
		t.Fatalf("ban: exit %d %s\n%s", code, errOut, out)
	}
	if got := listJSON(); len(got) != 1 || !got[0].Banned {
		t.Fatalf("after ban: %+v", got)
	}
	out, _, _ = run(t, "agent", "show", id, admin)
	if !strings.Contains(out, "banned") || !strings.Contains(out, "BANNED AT") {
		t.Fatalf("show of a banned agent:\n%s", out)
	}
	_, errOut, code = run(t, "agent", "evict", "web-1", admin)
	if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "unban it first") {
		t.Fatalf("evict of a banned agent: exit %d %q", code, errOut)
	}
	out, errOut, code = run(t, "agent", "unban", "web-1", admin)
	if code != 0 || !strings.Contains(out, "unbanned "+id) {
		t.Fatalf("unban: exit %d %s\n%s", code, errOut, out)
	}
	out, errOut, code = run(t, "agent", "evict", "web-1", admin, "-o", "json")
	var evicted struct {
		Agent agentJSON `json:"agent"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &evicted) != nil || evicted.Agent.ID != id {
		t.Fatalf("evict -o json: exit %d %s\n%s", code, errOut, out)
	}
	if got := listJSON(); len(got) != 0 {
		t.Fatalf("after evict: %+v, want none", got)
	}
}
