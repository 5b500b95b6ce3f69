package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"

	"github.com/meshid/meshid/attest"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// testNodes is a NodeAttestor whose proof is the node's name, and the
// NodeWorkloads of a cluster whose pods the test places: the seams
// kube/psat and kube/nodepods fill against a real API server (e2e).
type testNodes struct {
	srv *Server

	mu   sync.Mutex
	pods map[string][]string // node -> ns/sa
	gen  map[string]uint64
}

func (n *testNodes) Method() string { return "k8s_psat" }

func (n *testNodes) Attest(_ context.Context, payload []byte) (attest.NodeClaim, error) {
	node := string(payload)
	if !strings.HasPrefix(node, "node-") {
		return attest.NodeClaim{}, fmt.Errorf("%w: token of service account x/y is not trusted", attest.ErrNodeRefused)
	}
	return attest.NodeClaim{Path: []string{"c1", "uid-" + node}, Node: node, Selectors: []string{"k8s_psat:node-name:" + node}}, nil
}

func (n *testNodes) ServiceAccounts(node string) ([]string, uint64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.pods[node]), n.gen[node]
}

// place sets the service accounts with pods on node, as a pod informer
// would see them change.
func (n *testNodes) place(node string, sas ...string) {
	n.mu.Lock()
	n.pods[node] = sas
	n.gen[node]++
	n.mu.Unlock()
	n.srv.NodeWorkloadsChanged(node)
}

func (a *agentAPI) attestPSAT(t *testing.T, node string) (*tls.Certificate, string) {
	t.Helper()
	key, csr := newKeyCSR(t, "")
	resp, err := a.dial(t, nil).Attest(context.Background(), &agentv1.AttestRequest{Method: "k8s_psat", Payload: []byte(node), Csr: csr})
	if err != nil {
		t.Fatalf("attest %s: %v", node, err)
	}
	return &tls.Certificate{Certificate: resp.GetSvidChain(), PrivateKey: key}, resp.GetSpiffeId()
}

func entryIDs(es []*agentv1.Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.GetId()+"="+e.GetSpiffeId())
	}
	slices.Sort(out)
	return out
}

// TestDefaultIdentities: an agent attested by k8s_psat is served, with no
// entry, spiffe://<td>/ns/<ns>/sa/<sa> for exactly the service accounts
// with pods on its node (an excluded namespace aside); it may have only
// those signed; a pod leaving the node withdraws it at once (pushed); an
// entry naming the same SPIFFE ID replaces the default.
func TestDefaultIdentities(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nodes := &testNodes{pods: map[string][]string{}, gen: map[string]uint64{}}
	a := startAgentAPIWith(t, func(c *Config) {
		c.NodeAttestors = []attest.NodeAttestor{nodes}
		c.DefaultIdentities = nodes
		c.ExcludeNamespaces = []string{"kube-system"}
	})
	nodes.srv = a.srv
	nodes.place("node-a", "shop/web", "kube-system/coredns")
	nodes.place("node-b", "shop/db")

	// A refused proof: PermissionDenied with the attestor's reason.
	_, csr := newKeyCSR(t, "")
	_, err := a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "k8s_psat", Payload: []byte("evil"), Csr: csr})
	wantCode(t, "attest with a refused token", err, codes.PermissionDenied)
	if !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("refusal %q does not say why", err)
	}

	certA, idA := a.attestPSAT(t, "node-a")
	if want := "spiffe://cluster.local/meshid/agent/k8s_psat/c1/uid-node-a"; idA != want {
		t.Fatalf("node id %s, want %s", idA, want)
	}
	rec, ok := a.srv.agentRecord(idA)
	if !ok || rec.Node != "node-a" || rec.Method != "k8s_psat" || !slices.Equal(rec.Selectors, []string{"k8s_psat:node-name:node-a"}) {
		t.Fatalf("agent record %+v", rec)
	}
	certB, _ := a.attestPSAT(t, "node-b")

	ca := a.dial(t, certA)
	stream, err := ca.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := entryIDs(first.GetEntries()), []string{"k8s-default:shop/web=spiffe://cluster.local/ns/shop/sa/web"}; !slices.Equal(got, want) {
		t.Fatalf("node-a's agent is served %v, want %v", got, want)
	}
	if sels := first.GetEntries()[0].GetSelectors(); len(sels) != 2 || sels[0].GetValue() != "ns:shop" || sels[1].GetValue() != "sa:web" {
		t.Fatalf("default identity selectors %v", sels)
	}

	// Signing: its own default identity, with the SAN from the server;
	// not one whose pods run elsewhere, nor one with no pod at all.
	_, liar := newKeyCSR(t, "spiffe://cluster.local/ns/kube-system/sa/admin")
	resp, err := ca.SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{
		{EntryId: "k8s-default:shop/web", Csr: liar},
		{EntryId: "k8s-default:shop/db", Csr: liar},
		{EntryId: "k8s-default:kube-system/coredns", Csr: liar},
	}})
	if err != nil {
		t.Fatal(err)
	}
	got := resp.GetSvids()
	if got[0].GetCode() != 0 {
		t.Fatalf("own default identity: %d %s", got[0].GetCode(), got[0].GetMessage())
	}
	leaf, err := x509.ParseCertificate(got[0].GetSvidChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	if sid, _ := x509svid.IDFromCert(leaf); sid.String() != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Fatalf("signed for %s", sid)
	}
	for i := 1; i < 3; i++ {
		if c := codes.Code(got[i].GetCode()); c != codes.PermissionDenied || len(got[i].GetSvidChain()) != 0 {
			t.Errorf("item %d: %s %q, want PermissionDenied", i, c, got[i].GetMessage())
		}
	}
	// Node b's agent may not have node a's identity signed.
	rb, err := a.dial(t, certB).SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{{EntryId: "k8s-default:shop/web", Csr: liar}}})
	if err != nil {
		t.Fatal(err)
	}
	if c := codes.Code(rb.GetSvids()[0].GetCode()); c != codes.PermissionDenied {
		t.Fatalf("node-b signing node-a's identity: %s", c)
	}
	// Nor a JWT-SVID.
	_, err = a.dial(t, certB).SignJWTSVID(ctx, &agentv1.SignJWTSVIDRequest{EntryId: "k8s-default:shop/web", Audience: []string{"x"}})
	wantCode(t, "JWT for another node's identity", err, codes.PermissionDenied)

	// A second service account scheduled, then the first one's pods gone:
	// each pushed.
	nodes.place("node-a", "shop/web", "shop/cart")
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got := entryIDs(next.GetEntries()); !slices.Equal(got, []string{"k8s-default:shop/cart=spiffe://cluster.local/ns/shop/sa/cart"}) {
		t.Fatalf("after a pod was scheduled: %v", next)
	}
	nodes.place("node-a", "shop/cart")
	gone, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gone.GetDeletedEntryIds(), []string{"k8s-default:shop/web"}) {
		t.Fatalf("after the pod left: %v, want shop/web withdrawn", gone)
	}
	resp, err = ca.SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{{EntryId: "k8s-default:shop/web", Csr: liar}}})
	if err != nil {
		t.Fatal(err)
	}
	if c := codes.Code(resp.GetSvids()[0].GetCode()); c != codes.PermissionDenied {
		t.Fatalf("signing a withdrawn default identity: %s", c)
	}

	// An entry for the default's SPIFFE ID governs it: the default goes,
	// the entry comes.
	e, err := a.srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/cart", Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	swap, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(swap.GetDeletedEntryIds(), []string{"k8s-default:shop/cart"}) || !slices.Equal(entryIDs(swap.GetEntries()), []string{e.ID + "=" + e.SpiffeID}) {
		t.Fatalf("after an entry for the default's ID: %v", swap)
	}
}
