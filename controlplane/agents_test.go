package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// serveAgentAPI is startAgentAPI on a server the test opened.
func serveAgentAPI(t *testing.T, srv *Server) *agentAPI {
	t.Helper()
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

func leafOf(t *testing.T, cert *tls.Certificate) *x509.Certificate {
	t.Helper()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// agentToken makes a join token for node.
func agentToken(t *testing.T, s *Server, node string) string {
	t.Helper()
	tok, _, err := s.CreateAgentToken(context.Background(), node, time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// openSync opens a Sync stream and reads the first snapshot.
func openSync(t *testing.T, ctx context.Context, c agentv1.AgentServiceClient) agentv1.AgentService_SyncClient {
	t.Helper()
	stream, err := c.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if first, err := stream.Recv(); err != nil || !first.GetFull() {
		t.Fatalf("first sync response %v, %v: want the snapshot", first, err)
	}
	return stream
}

// syncEnds reads the stream until it ends and returns why.
func syncEnds(t *testing.T, stream agentv1.AgentService_SyncClient) error {
	t.Helper()
	for {
		if _, err := stream.Recv(); err != nil {
			return err
		}
	}
}

// signFor asks for one workload SVID for entry id.
func signFor(t *testing.T, ctx context.Context, c agentv1.AgentServiceClient, id string) (*agentv1.SignedX509SVID, error) {
	t.Helper()
	_, csr := newKeyCSR(t, "")
	resp, err := c.SignX509SVIDs(ctx, &agentv1.SignX509SVIDsRequest{Csrs: []*agentv1.CSRForEntry{{EntryId: id, Csr: csr}}})
	if err != nil {
		return nil, err
	}
	return resp.GetSvids()[0], nil
}

// onCRL reports whether the CRLs s pushes to peers refuse leaf.
func onCRL(t *testing.T, s *Server, leaf *x509.Certificate) bool {
	t.Helper()
	crls := s.agentBundle().GetCrls()
	for _, issuer := range s.BundleCerts() {
		revoked, err := CheckCRLs(leaf, issuer, crls)
		if err != nil {
			t.Fatal(err)
		}
		if revoked {
			return true
		}
	}
	return false
}

// TestAgentRecordBanUnban: an attested agent is recorded (method, node,
// node SVID expiry, seen); a ban ends its open stream at once, refuses
// every call and a new attestation of its node, and puts its node SVID
// and the workload SVIDs it had signed on the CRLs peers get; unban lets a
// new token attest it again.
func TestAgentRecordBanUnban(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	before := a.srv.now()
	cert, id := a.attest(t, agentToken(t, a.srv, "web-1"))
	nodeLeaf := leafOf(t, cert)

	list, err := a.srv.ListAgents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 {
		t.Fatalf("%d agents listed after one attestation", len(list))
	}
	r := list[0]
	if r.ID != id.String() || r.Method != "join_token" || r.Node != "web-1" || r.Banned ||
		!r.SVIDExpiry().Equal(nodeLeaf.NotAfter) || r.FirstSeen.Before(before.Add(-time.Second)) || r.LastSeen.Before(r.FirstSeen) {
		t.Fatalf("agent record %+v; want %s, join_token, web-1, node SVID expiry %s", r, id, nodeLeaf.NotAfter)
	}

	e, err := a.srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web", Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	c := a.dial(t, cert)
	stream := openSync(t, ctx, c)
	if got, err := a.srv.GetAgent(ctx, "web-1"); err != nil || got.Streams != 1 || got.LastSeen.Before(r.LastSeen) {
		t.Fatalf("GetAgent by node name while connected: %+v, %v; want one stream", got, err)
	}
	signed, err := signFor(t, ctx, c, e.ID)
	if err != nil || signed.GetCode() != 0 {
		t.Fatalf("sign before the ban: %v %v", signed, err)
	}
	wlLeaf, err := x509.ParseCertificate(signed.GetSvidChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	// A renewal adds a node SVID the agent is admitted with too.
	key, csr := newKeyCSR(t, "")
	ren, err := c.Renew(ctx, &agentv1.RenewRequest{Csr: csr})
	if err != nil {
		t.Fatal(err)
	}
	renewed := &tls.Certificate{Certificate: ren.GetSvidChain(), PrivateKey: key}
	renewedLeaf := leafOf(t, renewed)
	if got, _ := a.srv.GetAgent(ctx, id.String()); len(got.NodeSVIDs) != 2 || got.NodeSVIDs[1].Serial != renewedLeaf.SerialNumber.Text(16) {
		t.Fatalf("after a renewal the record lists %+v", got.NodeSVIDs)
	}
	if onCRL(t, a.srv, nodeLeaf) || onCRL(t, a.srv, wlLeaf) {
		t.Fatal("on the CRL before the ban")
	}

	ag, serials, err := a.srv.BanAgent(ctx, id.String(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if !ag.Banned || ag.BannedAt.IsZero() {
		t.Fatalf("BanAgent returned %+v", ag)
	}
	var revoked []string
	for _, s := range serials {
		revoked = append(revoked, s.Serial)
	}
	for _, l := range []*x509.Certificate{nodeLeaf, renewedLeaf, wlLeaf} {
		if !slices.Contains(revoked, l.SerialNumber.Text(16)) {
			t.Errorf("serial %s (%s) not revoked by the ban: %v", l.SerialNumber.Text(16), l.URIs, revoked)
		}
		if !onCRL(t, a.srv, l) {
			t.Errorf("%s %s is not on the pushed CRLs", l.URIs, l.SerialNumber.Text(16))
		}
	}
	wantCode(t, "the open Sync stream after the ban", syncEnds(t, stream), codes.PermissionDenied)
	_, err = signFor(t, ctx, c, e.ID)
	wantCode(t, "sign after the ban", err, codes.PermissionDenied)
	if !strings.Contains(status.Convert(err).Message(), "banned") {
		t.Fatalf("sign after the ban: %v, want it to say banned", err)
	}
	_, err = c.SignJWTSVID(ctx, &agentv1.SignJWTSVIDRequest{EntryId: e.ID, Audience: []string{"x"}})
	wantCode(t, "JWT sign after the ban", err, codes.PermissionDenied)
	_, csr = newKeyCSR(t, "")
	_, err = c.Renew(ctx, &agentv1.RenewRequest{Csr: csr})
	wantCode(t, "renew after the ban", err, codes.PermissionDenied)
	if s2, err := c.Sync(ctx, &agentv1.SyncRequest{}); err == nil {
		err = syncEnds(t, s2)
		wantCode(t, "a new Sync after the ban", err, codes.PermissionDenied)
	} else {
		wantCode(t, "a new Sync after the ban", err, codes.PermissionDenied)
	}
	// A new connection with the revoked node SVID fails its handshake.
	if _, err := signFor(t, ctx, a.dial(t, renewed), e.ID); status.Code(err) != codes.Unavailable && status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a new connection with the banned agent's node SVID: %v, want it refused", err)
	}
	_, err = a.dial(t, nil).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(agentToken(t, a.srv, "web-1")), Csr: csr})
	wantCode(t, "a new token for the banned node", err, codes.PermissionDenied)
	// Banning again is harmless: the same serials, nothing new signed
	// for the node in between (the refused attestation signed nothing).
	if _, again, err := a.srv.BanAgent(ctx, id.String(), "test"); err != nil || len(again) != len(serials) {
		t.Fatalf("ban again: %v revoked, %v; want the %d of the first ban", again, err, len(serials))
	}

	if _, err := a.srv.UnbanAgent(ctx, "web-1", "test"); err != nil {
		t.Fatal(err)
	}
	_, err = a.srv.UnbanAgent(ctx, "web-1", "test")
	if !errors.As(err, new(*FailedPreconditionError)) {
		t.Fatalf("unban of an agent not banned: %v, want FailedPrecondition", err)
	}
	// The revoked node SVID stays refused; a new token works.
	_, err = signFor(t, ctx, c, e.ID)
	wantCode(t, "sign with the old node SVID after unban", err, codes.PermissionDenied)
	cert2, id2 := a.attest(t, agentToken(t, a.srv, "web-1"))
	if id2 != id {
		t.Fatalf("re-attested as %s, want %s", id2, id)
	}
	c2 := a.dial(t, cert2)
	openSync(t, ctx, c2)
	if signed, err := signFor(t, ctx, c2, e.ID); err != nil || signed.GetCode() != 0 {
		t.Fatalf("sign after unban and a new attestation: %v %v", signed, err)
	}
}

// TestAgentEvict: eviction ends the stream and refuses the node SVID
// (evicted: attest again) until a new token attests the agent; the node
// SVID from before stays refused after that.
func TestAgentEvict(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	cert, id := a.attest(t, agentToken(t, a.srv, "web-2"))
	c := a.dial(t, cert)
	stream := openSync(t, ctx, c)

	old, err := a.srv.EvictAgent(ctx, id.String(), "test")
	if err != nil || old.ID != id.String() {
		t.Fatalf("evict: %+v, %v", old, err)
	}
	err = syncEnds(t, stream)
	wantCode(t, "the open Sync stream after evict", err, codes.PermissionDenied)
	if !strings.Contains(status.Convert(err).Message(), "evicted: attest again") {
		t.Fatalf("stream ended with %v, want it to say evicted: attest again", err)
	}
	_, err = signFor(t, ctx, c, "any")
	wantCode(t, "sign after evict", err, codes.PermissionDenied)
	if _, err := a.srv.GetAgent(ctx, id.String()); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetAgent after evict: %v, want not found", err)
	}
	_, err = a.srv.EvictAgent(ctx, id.String(), "test")
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("evict twice: %v, want not found", err)
	}

	cert2, _ := a.attest(t, agentToken(t, a.srv, "web-2"))
	openSync(t, ctx, a.dial(t, cert2))
	_, err = a.dial(t, cert).Renew(ctx, &agentv1.RenewRequest{Csr: func() []byte { _, c := newKeyCSR(t, ""); return c }()})
	wantCode(t, "renew with the node SVID from before the eviction", err, codes.PermissionDenied)

	// A banned agent is not evicted (that would lift the ban).
	if _, _, err := a.srv.BanAgent(ctx, id.String(), "test"); err != nil {
		t.Fatal(err)
	}
	_, err = a.srv.EvictAgent(ctx, id.String(), "test")
	if !errors.As(err, new(*FailedPreconditionError)) {
		t.Fatalf("evict of a banned agent: %v, want FailedPrecondition", err)
	}
}

// TestAgentBadInput: unknown or malformed agent names are refused with
// the right error and change nothing.
func TestAgentBadInput(t *testing.T) {
	ctx := context.Background()
	a := startAgentAPI(t)
	a.attest(t, agentToken(t, a.srv, "web-3"))
	snap := func() ([]store.AgentRecord, int64) {
		list, err := a.srv.store.ListAgents(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rev, err := a.srv.store.Revision(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return list, rev
	}
	list0, rev0 := snap()
	for _, tc := range []struct {
		ref  string
		want error
	}{
		{"spiffe://cluster.local/meshid/agent/join/nope", store.ErrNotFound},
		{"nope", store.ErrNotFound},
		{"spiffe://cluster.local/ns/shop/sa/web", nil},
		{"bad/node", nil},
		{"", nil},
	} {
		check := func(op string, err error) {
			t.Helper()
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("%s %q: %v, want %v", op, tc.ref, err, tc.want)
			}
			if tc.want == nil && !errors.As(err, new(*InvalidArgumentError)) {
				t.Errorf("%s %q: %v, want InvalidArgument", op, tc.ref, err)
			}
		}
		_, err := a.srv.GetAgent(ctx, tc.ref)
		check("get", err)
		_, err = a.srv.EvictAgent(ctx, tc.ref, "test")
		check("evict", err)
		_, _, err = a.srv.BanAgent(ctx, tc.ref, "test")
		check("ban", err)
		_, err = a.srv.UnbanAgent(ctx, tc.ref, "test")
		check("unban", err)
	}
	if list, rev := snap(); !reflect.DeepEqual(list, list0) || rev != rev0 {
		t.Fatalf("refused calls changed the store: %+v at %d, was %+v at %d", list, rev, list0, rev0)
	}
}

// TestAgentBanReachesReplicas: a ban made through one replica ends the
// agent's stream on another and that replica refuses it and pushes the
// CRL listing its node SVID: the record travels through the store's watch.
func TestAgentBanReachesReplicas(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	kekFile := filepath.Join(dir, "kek")
	ra := openReplica(t, bs, kekFile)
	defer ra.Close()
	rb := openReplica(t, bs, kekFile)
	defer rb.Close()
	b := serveAgentAPI(t, rb)

	cert, id := b.attest(t, agentToken(t, ra, "web-4"))
	c := b.dial(t, cert)
	stream := openSync(t, ctx, c)
	if err := ra.synced(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := ra.GetAgent(ctx, "web-4"); err != nil || got.ID != id.String() {
		t.Fatalf("replica A does not see the agent B attested: %+v, %v", got, err)
	}
	if _, _, err := ra.BanAgent(ctx, id.String(), "test"); err != nil {
		t.Fatal(err)
	}
	wantCode(t, "the stream on replica B after a ban on A", syncEnds(t, stream), codes.PermissionDenied)
	if err := rb.synced(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = signFor(t, ctx, c, "any")
	wantCode(t, "sign on replica B after a ban on A", err, codes.PermissionDenied)
	if !onCRL(t, rb, leafOf(t, cert)) {
		t.Fatal("replica B's CRLs do not list the banned agent's node SVID")
	}
}

// TestAgentReattestSupersedes: a new attestation of a node (a new token,
// e.g. the node was rebuilt) ends the streams of the node SVID it
// replaces and refuses that SVID from then on.
func TestAgentReattestSupersedes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a := startAgentAPI(t)
	oldCert, _ := a.attest(t, agentToken(t, a.srv, "web-5"))
	oldConn := a.dial(t, oldCert)
	stream := openSync(t, ctx, oldConn)
	newCert, _ := a.attest(t, agentToken(t, a.srv, "web-5"))
	err := syncEnds(t, stream)
	wantCode(t, "the stream of the superseded node SVID", err, codes.PermissionDenied)
	if !strings.Contains(status.Convert(err).Message(), "before its last attestation") {
		t.Fatalf("stream ended with %v", err)
	}
	_, err = signFor(t, ctx, oldConn, "any")
	wantCode(t, "sign with the superseded node SVID", err, codes.PermissionDenied)
	openSync(t, ctx, a.dial(t, newCert))
}
