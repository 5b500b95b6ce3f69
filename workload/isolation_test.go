package workload_test

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// TestUnservableEntryDoesNotTakeTheOthers: an entry stored by an older
// version with a DNS SAN the CA refuses (an IP address) matches the same
// uid as a good entry. The caller must still get the good SVID and the
// bundle over the Workload API (go-spiffe) and over an SDS stream; the bad
// one is counted and retried.
func TestUnservableEntryDoesNotTakeTheOthers(t *testing.T) {
	ctx := testCtx(t)
	bs, err := boltstore.Open(filepath.Join(t.TempDir(), "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	uid := "uid:" + strconv.Itoa(os.Getuid())
	// Written with the store, past today's validator, as an older version
	// did. Its SPIFFE ID sorts first, so it would be the default SVID.
	bad := store.Entry{
		ID: "entry-from-an-older-version", SpiffeID: "spiffe://cluster.local/a/old",
		Selectors: []store.Selector{{Type: "unix", Value: uid}}, DNSNames: []string{"10.0.0.1"}, CreatedAt: time.Now(),
	}
	if err := bs.CreateEntry(ctx, bad, store.AuditEvent{Action: "entry.create", Target: bad.ID}); err != nil {
		t.Fatal(err)
	}
	// And one the JWT key refuses: another trust domain's ID.
	foreign := store.Entry{
		ID: "foreign-entry-from-an-older-version", SpiffeID: "spiffe://other.example/a/old",
		Selectors: []store.Selector{{Type: "unix", Value: uid}}, CreatedAt: time.Now(),
	}
	if err := bs.CreateEntry(ctx, foreign, store.AuditEvent{Action: "entry.create", Target: foreign.ID}); err != nil {
		t.Fatal(err)
	}
	h := startServer(t, controlplane.Config{Store: bs})
	h.entry(t, idA, "unix:"+uid)

	jwts, err := h.client(t).FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "isolation"})
	if err != nil {
		t.Fatalf("jwt-svids: %v (one bad entry took every identity)", err)
	}
	// The DNS names that make the first entry unservable as X.509 do not
	// matter to a JWT-SVID: it and idA are served, the foreign one is not.
	var ids []string
	for _, j := range jwts {
		ids = append(ids, j.ID.String())
	}
	if !slices.Equal(ids, []string{bad.SpiffeID, idA}) {
		t.Fatalf("jwt-svids for %v, want %v", ids, []string{bad.SpiffeID, idA})
	}

	xc, err := h.client(t).FetchX509Context(ctx)
	if err != nil {
		t.Fatalf("workload api: %v (one bad entry took every identity)", err)
	}
	if len(xc.SVIDs) != 1 || xc.SVIDs[0].ID.String() != idA {
		t.Fatalf("workload api served %d SVIDs (%v), want only %s", len(xc.SVIDs), xc.SVIDs, idA)
	}
	b, err := xc.Bundles.GetX509BundleForTrustDomain(mustID(idA).TrustDomain())
	if err != nil || len(b.X509Authorities()) == 0 {
		t.Fatalf("workload api bundle: %v", err)
	}

	conn, err := grpc.NewClient("unix://"+h.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "isolation", Cluster: "test", UserAgentName: "envoy"}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{"default", "ROOTCA"}, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	got := map[string]*tlsv3.Secret{}
	for got["default"] == nil || got["ROOTCA"] == nil {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("sds: %v (have %v)", err, keys(got))
		}
		for _, r := range resp.GetResources() {
			var s tlsv3.Secret
			if err := r.UnmarshalTo(&s); err != nil {
				t.Fatal(err)
			}
			got[s.GetName()] = &s
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{"default", "ROOTCA"}, TypeUrl: sds.SecretTypeURL,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			t.Fatal(err)
		}
	}
	if got["ROOTCA"].GetValidationContext().GetTrustedCa().GetInlineBytes() == nil {
		t.Fatal("sds ROOTCA has no trusted CA")
	}
	chain, err := parseChainPEM(got["default"].GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if err != nil {
		t.Fatal(err)
	}
	if len(chain[0].URIs) != 1 || chain[0].URIs[0].String() != idA {
		t.Fatalf("sds default is %v, want %s", chain[0].URIs, idA)
	}

	// Counted, and retried with backoff (a second failure follows).
	failures := h.srv.Metrics().MintFailures.WithLabelValues("invalid")
	deadline := time.Now().Add(waitLong)
	for counterValue(t, failures) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("meshid_svid_mint_failures_total{reason=invalid} = %v, want a retried failure", counterValue(t, failures))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func parseChainPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificates")
	}
	return out, nil
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestEntryHintAndUpdateServed: the Workload API hint is the entry's
// --hint when it has one, and an update (new DNS name, new hint) reaches a
// connected workload without a restart.
func TestEntryHintAndUpdateServed(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	ctx := testCtx(t)
	sels, err := controlplane.PIDSelectors(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	e, err := h.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: idA, Selectors: sels, Hint: "web"}, "test")
	if err != nil {
		t.Fatal(err)
	}
	c := h.client(t)
	svids, err := c.FetchX509SVIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(svids) != 1 || svids[0].Hint != "web" {
		t.Fatalf("hint %q, want the entry's hint \"web\"", svids[0].Hint)
	}
	dns, hint := []string{"web.shop.svc"}, "web-v2"
	if _, err := h.srv.UpdateEntry(ctx, e.ID, controlplane.EntryUpdate{DNSNames: &dns, Hint: &hint}, "test"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitLong)
	for {
		svids, err := c.FetchX509SVIDs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(svids) == 1 && svids[0].Hint == hint && len(svids[0].Certificates[0].DNSNames) == 1 &&
			svids[0].Certificates[0].DNSNames[0] == dns[0] {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the update: hint %q dns %v", svids[0].Hint, svids[0].Certificates[0].DNSNames)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
