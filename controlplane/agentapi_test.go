package controlplane

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/identity"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// agentAPI is a server's agent API on loopback TLS, as Run serves it.
type agentAPI struct {
	srv  *Server
	addr string
	pool *x509.CertPool
}

func startAgentAPI(t *testing.T) *agentAPI {
	t.Helper()
	return startAgentAPIWith(t, nil)
}

// startAgentAPIWith is startAgentAPI with Config changed by with.
func startAgentAPIWith(t *testing.T, with func(*Config)) *agentAPI {
	t.Helper()
	cfg := Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 48 * time.Hour}
	if with != nil {
		with(&cfg)
	}
	srv, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	st, err := srv.newServerTLS(context.Background(), []string{"localhost"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.close)
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(st.config("h2"))))
	agentv1.RegisterAgentServiceServer(g, NewAgentService(srv))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	t.Cleanup(g.Stop)
	pool := x509.NewCertPool()
	for _, c := range srv.BundleCerts() {
		pool.AddCert(c)
	}
	return &agentAPI{srv: srv, addr: l.Addr().String(), pool: pool}
}

// dial connects as an agent: trusting the bundle for the server's SVID,
// presenting cert (nil: none, before attestation).
func (a *agentAPI) dial(t *testing.T, cert *tls.Certificate) agentv1.AgentServiceClient {
	t.Helper()
	cfg := &tls.Config{RootCAs: a.pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	cc, err := grpc.NewClient(a.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return agentv1.NewAgentServiceClient(cc)
}

func newKeyCSR(t *testing.T, uri string) (crypto.Signer, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	if uri != "" {
		u, _ := url.Parse(uri)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

// attest spends an agent token and returns the node SVID as a TLS
// certificate.
func (a *agentAPI) attest(t *testing.T, token string) (*tls.Certificate, spiffeid.ID) {
	t.Helper()
	key, csr := newKeyCSR(t, "")
	resp, err := a.dial(t, nil).Attest(context.Background(), &agentv1.AttestRequest{Method: "join_token", Payload: []byte(token), Csr: csr})
	if err != nil {
		t.Fatalf("attest: %v", err)
	}
	id, err := spiffeid.FromString(resp.GetSpiffeId())
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: resp.GetSvidChain(), PrivateKey: key}, id
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %s", what, err, code)
	}
}

// TestAgentAttestSyncSign: an agent attests with its token, then over
// mTLS gets its entries and the bundle pushed, and changes as they
// happen, and has CSRs signed for the entries it may serve only.
func TestAgentAttestSyncSign(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	tok, _, err := a.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	cert, id := a.attest(t, tok)
	if want := "spiffe://cluster.local/meshid/agent/join/web-1"; id.String() != want {
		t.Fatalf("node id %s, want %s", id, want)
	}
	// The node SVID verifies against the bundle.
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify([]*x509.Certificate{leaf}, x509bundle.FromX509Authorities(a.srv.td, a.srv.BundleCerts())); err != nil {
		t.Fatalf("node SVID: %v", err)
	}
	// A spent token attests nothing more; nor does a workload token.
	_, csr := newKeyCSR(t, "")
	_, err = a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(tok), Csr: csr})
	wantCode(t, "attest with a spent token", err, codes.PermissionDenied)
	wl, _, err := a.srv.CreateJoinToken(ctx, "spiffe://cluster.local/ns/a/sa/x", time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(wl), Csr: csr})
	wantCode(t, "attest with a workload token", err, codes.PermissionDenied)
	_, err = a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "k8s_psat", Payload: []byte("x"), Csr: csr})
	wantCode(t, "attest with an unknown method", err, codes.InvalidArgument)
	// Without the node SVID, nothing but Attest.
	_, err = a.dial(t, nil).SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{{EntryId: "x", Csr: csr}}})
	wantCode(t, "sign without a node SVID", err, codes.Unauthenticated)

	mine, err := a.srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web", Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	c := a.dial(t, cert)
	stream, err := c.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !first.GetFull() || len(first.GetEntries()) != 1 || first.GetEntries()[0].GetId() != mine.ID || first.GetBundle() == nil || len(first.GetBundle().GetX509Authorities()) == 0 {
		t.Fatalf("first sync response %v: want a full snapshot with the entry and the bundle", first)
	}
	// A new entry is pushed, not polled for.
	second, err := a.srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/db", Selectors: []store.Selector{{Type: "unix", Value: "uid:1001"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if next.GetFull() || len(next.GetEntries()) != 1 || next.GetEntries()[0].GetId() != second.ID {
		t.Fatalf("after a new entry: %v, want just that entry", next)
	}
	if _, _, err := a.srv.DeleteEntry(ctx, second.ID, "test"); err != nil {
		t.Fatal(err)
	}
	gone, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// The deletion may come with the bundle it re-signed (a revocation of
	// nothing changes no CRL, but be lenient on that).
	if len(gone.GetDeletedEntryIds()) != 1 || gone.GetDeletedEntryIds()[0] != second.ID {
		t.Fatalf("after deleting an entry: %v, want its id", gone)
	}

	// Another agent's entry: refused for that item only.
	theirs := store.Entry{ID: "theirs", SpiffeID: "spiffe://cluster.local/ns/shop/sa/other", Selectors: []store.Selector{{Type: "unix", Value: "uid:7"}},
		ParentID: "spiffe://cluster.local/meshid/agent/join/web-2", CreatedAt: time.Now()}
	if err := a.srv.store.CreateEntry(ctx, theirs, store.AuditEvent{Action: "entry.create", Target: theirs.ID}); err != nil {
		t.Fatal(err)
	}
	if err := a.srv.synced(ctx); err != nil {
		t.Fatal(err)
	}
	// The CSR asks for another identity; the SAN comes from the entry.
	key, liar := newKeyCSR(t, "spiffe://cluster.local/ns/kube-system/sa/admin")
	resp, err := c.SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{
		{EntryId: mine.ID, Csr: liar},
		{EntryId: theirs.ID, Csr: liar},
		{EntryId: "nope", Csr: liar},
		{EntryId: mine.ID, Csr: []byte("not a csr")},
	}})
	if err != nil {
		t.Fatal(err)
	}
	got := resp.GetSvids()
	if len(got) != 4 {
		t.Fatalf("%d answers to 4 CSRs", len(got))
	}
	if got[0].GetCode() != 0 {
		t.Fatalf("own entry: %d %s", got[0].GetCode(), got[0].GetMessage())
	}
	svidLeaf, err := x509.ParseCertificate(got[0].GetSvidChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	if sid, _ := x509svid.IDFromCert(svidLeaf); sid.String() != mine.SpiffeID {
		t.Fatalf("signed for %s, want the entry's %s", sid, mine.SpiffeID)
	}
	if !svidLeaf.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Fatal("the SVID is not for the CSR's key")
	}
	for i, want := range []codes.Code{codes.PermissionDenied, codes.NotFound, codes.InvalidArgument} {
		if c := codes.Code(got[i+1].GetCode()); c != want || len(got[i+1].GetSvidChain()) != 0 {
			t.Errorf("item %d: %s %q, want %s and no certificate", i+1, c, got[i+1].GetMessage(), want)
		}
	}
	// The server's own socket does not serve an entry that has a parent.
	if m := a.srv.match.Match(identity.Caller{Selectors: []string{"unix:uid:7"}}); len(m) != 0 {
		t.Fatalf("the server's matcher serves an agent's entry: %v", m)
	}
}

// TestAgentTokenIsNoWorkloadToken: an agent's join token presented on the
// workload endpoints is refused without being spent.
func TestAgentTokenIsNoWorkloadToken(t *testing.T) {
	ctx := context.Background()
	a := startAgentAPI(t)
	tok, _, err := a.srv.CreateAgentToken(ctx, "", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.srv.RedeemJoinToken(ctx, tok, "conn-1"); !errors.Is(err, ErrBadToken) {
		t.Fatalf("agent token on SDS: %v, want ErrBadToken", err)
	}
	if _, id := a.attest(t, tok); !a.srv.isAgentID(id) {
		t.Fatalf("attested as %s", id)
	}
	if _, _, err := a.srv.CreateAgentToken(ctx, "bad/node", time.Hour, "test"); err == nil {
		t.Fatal("a node id with a slash was accepted")
	}
}

// TestAgentAPILimits: attestations are bounded across callers, and each
// agent's signatures by a bucket, so one caller can neither starve the
// server nor fill its disk with inventory rows; a refused call spends no
// token and writes no row.
func TestAgentAPILimits(t *testing.T) {
	ctx := context.Background()
	a := startAgentAPI(t)
	a.srv.agentLim = newAgentLimits(0)
	a.srv.agentLim.attest.SetBurst(1)
	a.srv.agentLim.attest.SetLimit(0)
	a.srv.agentLim.signRate, a.srv.agentLim.signBurst = 0, 3

	tok, _, err := a.srv.CreateAgentToken(ctx, "n1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := a.attest(t, tok) // the one the burst allows
	tok2, _, err := a.srv.CreateAgentToken(ctx, "n2", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	_, csr := newKeyCSR(t, "")
	_, err = a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(tok2), Csr: csr})
	wantCode(t, "attest past the rate", err, codes.ResourceExhausted)
	a.srv.agentLim.attest.SetLimit(1000)
	a.srv.agentLim.attest.SetBurst(10)
	a.attest(t, tok2) // not spent by the refused call

	e, err := a.srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web", Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	c := a.dial(t, cert)
	batch := func(n int) *agentv1.SignX509SVIDsRequest {
		req := &agentv1.SignX509SVIDsRequest{}
		for range n {
			_, csr := newKeyCSR(t, "")
			req.Csrs = append(req.Csrs, &agentv1.CSRForEntry{EntryId: e.ID, Csr: csr})
		}
		return req
	}
	if _, err := c.SignX509SVIDs(ctx, batch(2)); err != nil {
		t.Fatal(err)
	}
	rows := func() int {
		r, _, err := a.srv.Store().ListSVIDs(ctx, store.SVIDQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return len(r)
	}
	before := rows()
	_, err = c.SignX509SVIDs(ctx, batch(2)) // 2 more than the 1 left
	wantCode(t, "sign past the agent's bucket", err, codes.ResourceExhausted)
	if after := rows(); after != before {
		t.Fatalf("a refused batch wrote %d inventory rows", after-before)
	}
	if _, err := c.SignX509SVIDs(ctx, batch(1)); err != nil {
		t.Fatalf("the one signature left: %v", err)
	}
}

// TestAgentSyncStreamsBounded: one agent cannot hold more than a few Sync
// streams (each a goroutine and a copy of its entries).
func TestAgentSyncStreamsBounded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	tok, _, err := a.srv.CreateAgentToken(ctx, "n1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := a.attest(t, tok)
	c := a.dial(t, cert)
	for i := range maxSyncPerAgent {
		st, err := c.Sync(ctx, &agentv1.SyncRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
	st, err := c.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	wantCode(t, "one stream too many", err, codes.ResourceExhausted)
}

// TestAgentSignRateConfig: Config.AgentSignRate (--agent-sign-rate) sets
// each agent's bucket; negative lifts it.
func TestAgentSignRateConfig(t *testing.T) {
	for _, tc := range []struct {
		in        float64
		wantRate  rate.Limit
		wantBurst int
	}{
		{0, signRate, signBurst},
		{5, 5, signBurst},
		{5000, 5000, 10000},
		{-1, rate.Inf, signBurst},
	} {
		l := newAgentLimits(tc.in)
		if l.signRate != tc.wantRate || l.signBurst != tc.wantBurst {
			t.Errorf("AgentSignRate %v: rate %v burst %d, want %v %d", tc.in, l.signRate, l.signBurst, tc.wantRate, tc.wantBurst)
		}
	}
	// Unlimited: a burst far past the default bucket passes.
	if err := newAgentLimits(-1).allowSign("a", 100*signBurst); err != nil {
		t.Fatal(err)
	}
}
