package sds_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/sds"
)

// clientTLS verifies the server as a SPIFFE peer (its SVID, its ID) and
// presents svid if given: what a remote proxy's SDS cluster does.
func clientTLS(h *harness, svid *x509svid.SVID) *tls.Config {
	td := h.srv.TrustDomain()
	bundle := x509bundle.FromX509Authorities(td, h.srv.BundleCerts())
	if svid == nil {
		return tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(h.srv.ServerID()))
	}
	return tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(h.srv.ServerID()))
}

func dialTCP(t *testing.T, h *harness, svid *x509svid.SVID) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(h.listen.SDSAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(h, svid))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

// mintSVID makes an SVID for id with a server-made key, as an operator
// would with `meshid x509 mint`.
func mintSVID(t *testing.T, h *harness, id string) *x509svid.SVID {
	t.Helper()
	s, err := h.srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: id, Requester: "test"})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.EncodeKeyPEM(s.Key)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := x509svid.Parse(s.ChainPEM(), key)
	if err != nil {
		t.Fatal(err)
	}
	return svid
}

func fetchDefault(ctx context.Context, c secretv3.SecretDiscoveryServiceClient) (*x509.Certificate, error) {
	resp, err := c.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyNode("remote"), ResourceNames: []string{"default"}, TypeUrl: sds.SecretTypeURL})
	if err != nil {
		return nil, err
	}
	var s tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&s); err != nil {
		return nil, err
	}
	certs, err := parseChain(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

func TestTCPWithClientSVIDRenewsItself(t *testing.T) {
	h := startServer(t, time.Hour)
	svid := mintSVID(t, h, idB)
	c := dialTCP(t, h, svid)
	s := openSotW(t, c, "remote-proxy", "default")
	chain, key := tlsCert(t, secrets(t, s.recv(), "default")["default"])
	if id := verifySVID(t, chain, key, h.srv.BundleCerts()); id.String() != idB {
		t.Fatalf("remote caller with an SVID for %s got %s", idB, id)
	}
	if chain[0].SerialNumber.Cmp(svid.Certificates[0].SerialNumber) == 0 {
		t.Fatal("got back the certificate it presented, not a renewal")
	}
	// It gets nothing of another identity's.
	_, err := c.FetchSecrets(context.Background(), &discoveryv3.DiscoveryRequest{ResourceNames: []string{idA}, TypeUrl: sds.SecretTypeURL})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("remote caller fetching %s: %v", idA, err)
	}
}

func TestTCPJoinTokens(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	reusable, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	single, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, true, "test")
	if err != nil {
		t.Fatal(err)
	}
	bearer := func(tok string) context.Context {
		return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}

	// Reusable: any number of connections.
	for range 2 {
		leaf, err := fetchDefault(bearer(reusable), dialTCP(t, h, nil))
		if err != nil || leaf.URIs[0].String() != idB {
			t.Fatalf("reusable token: %v %v", leaf, err)
		}
	}
	// Single-use: every stream of the first connection, then no other.
	first := dialTCP(t, h, nil)
	for range 2 {
		if _, err := fetchDefault(bearer(single), first); err != nil {
			t.Fatalf("single-use token on its own connection: %v", err)
		}
	}
	if _, err := fetchDefault(bearer(single), dialTCP(t, h, nil)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("single-use token on a second connection: %v, want Unauthenticated", err)
	}
	// No credential, a wrong token, an expired token.
	if _, err := fetchDefault(ctx, dialTCP(t, h, nil)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no credential: %v", err)
	}
	if _, err := fetchDefault(bearer("mjt_not-a-real-token"), dialTCP(t, h, nil)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("bad token: %v", err)
	}
	if _, _, err := h.srv.CreateJoinToken(ctx, "spiffe://evil.example/x", time.Hour, false, "test"); err == nil {
		t.Fatal("token for a foreign trust domain")
	}
}

func TestRESTSDS(t *testing.T) {
	h := startServer(t, time.Hour)
	tok, _, err := h.srv.CreateJoinToken(context.Background(), idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS(h, nil)}, Timeout: 30 * time.Second}
	t.Cleanup(client.CloseIdleConnections)
	url := "https://" + h.listen.SDSRESTAddr + sds.RESTPath
	body, _ := protojson.Marshal(&discoveryv3.DiscoveryRequest{Node: envoyNode("rest"), ResourceNames: []string{"default", "ROOTCA"}, TypeUrl: sds.SecretTypeURL})
	post := func(method, authz string, b []byte) (int, []byte) {
		req, _ := http.NewRequest(method, url, bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		if authz != "" {
			req.Header.Set("Authorization", authz)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, out
	}
	code, out := post(http.MethodPost, "Bearer "+tok, body)
	if code != http.StatusOK {
		t.Fatalf("REST SDS: %d %s", code, out)
	}
	var resp discoveryv3.DiscoveryResponse
	if err := protojson.Unmarshal(out, &resp); err != nil {
		t.Fatal(err)
	}
	got := map[string]*tlsv3.Secret{}
	for _, a := range resp.GetResources() {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		got[s.GetName()] = &s
	}
	chain, key := tlsCert(t, got["default"])
	if id := verifySVID(t, chain, key, trustedCA(t, got["ROOTCA"])); id.String() != idB {
		t.Fatalf("REST served %s", id)
	}
	for _, tc := range []struct {
		method, authz string
		body          []byte
		want          int
	}{
		{http.MethodPost, "", body, http.StatusUnauthorized},
		{http.MethodPost, "Bearer mjt_wrong", body, http.StatusUnauthorized},
		{http.MethodGet, "Bearer " + tok, nil, http.StatusMethodNotAllowed},
		{http.MethodPost, "Bearer " + tok, []byte("{not json"), http.StatusBadRequest},
		{http.MethodPost, "Bearer " + tok, []byte(`{"resource_names":["` + idA + `"]}`), http.StatusForbidden},
	} {
		if code, out := post(tc.method, tc.authz, tc.body); code != tc.want || !strings.Contains(string(out), "message") {
			t.Errorf("%s auth=%q: %d %s, want %d with a message", tc.method, tc.authz, code, out, tc.want)
		}
	}
}

// TestRevokedIdentityCannotComeBackRemotely: after revoking an ID, neither
// its join tokens nor its (now revoked) certificates get it served again.
func TestRevokedIdentityCannotComeBackRemotely(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	tok, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	bearer := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	svid := mintSVID(t, h, idB)
	certConn := dialTCP(t, h, svid)
	if _, err := fetchDefault(bearer, dialTCP(t, h, nil)); err != nil {
		t.Fatal(err)
	}
	if _, err := fetchDefault(ctx, certConn); err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Revoke(ctx, idB, "", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := fetchDefault(bearer, dialTCP(t, h, nil)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("token of a revoked identity: %v, want Unauthenticated", err)
	}
	// The connection opened with the certificate is still up: the check
	// must not rely on the handshake alone.
	if _, err := fetchDefault(ctx, certConn); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("revoked certificate on an open connection: %v, want Unauthenticated", err)
	}
	// A new token is the administrator's word that it may come back.
	tok2, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	if leaf, err := fetchDefault(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok2), dialTCP(t, h, nil)); err != nil || leaf.URIs[0].String() != idB {
		t.Fatalf("new token after revocation: %v", err)
	}
}
