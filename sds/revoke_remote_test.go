package sds_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
)

// revocationPushTime bounds how long a revocation may take to reach an
// open stream; it is far above what it takes (milliseconds), only so a
// broken run ends.
const revocationPushTime = 10 * time.Second

// ended waits for the stream to end and returns how it ended, skipping any
// responses still on their way.
func (s *sotw) ended(t *testing.T) error {
	t.Helper()
	deadline := time.After(revocationPushTime)
	for {
		select {
		case <-s.resps:
		case err := <-s.errs:
			s.errs <- err // for the cleanup, which waits for it
			return err
		case <-deadline:
			t.Fatalf("the stream is still open %s after the revocation", revocationPushTime)
			return nil
		}
	}
}

func svidOfSecret(t *testing.T, s *tlsv3.Secret) *x509svid.SVID {
	t.Helper()
	tc := s.GetTlsCertificate()
	v, err := x509svid.Parse(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func serialOf(v *x509svid.SVID) string { return v.Certificates[0].SerialNumber.Text(16) }

// remoteStream opens a TCP SDS stream authenticated with v and returns it
// with the SVID it is served.
func remoteStream(t *testing.T, h *harness, v *x509svid.SVID) (*sotw, *x509svid.SVID) {
	t.Helper()
	s := openSotW(t, dialTCP(t, h, v), "remote-proxy", "default")
	r := s.recv()
	s.ack(r)
	return s, svidOfSecret(t, secrets(t, r, "default")["default"])
}

// TestRevokedClientCertEndsItsStream: revoking the certificate a remote
// proxy authenticated with ends its stream with PermissionDenied, and
// nothing it was served since works any more; it must come back with a
// join token.
func TestRevokedClientCertEndsItsStream(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	stolen := mintSVID(t, h, idB)
	s, renewed := remoteStream(t, h, stolen)
	// The renewal opens connections of its own, and renews itself there.
	if _, err := fetchDefault(ctx, dialTCP(t, h, renewed)); err != nil {
		t.Fatalf("the served SVID on a new connection: %v", err)
	}
	// Another remote caller of the same identity, by token, is not this
	// holder: its stream stays.
	tok, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	bystander := openSotW(t, dialTCPToken(t, h, tok), "other-proxy", "default")
	bystander.ack(bystander.recv())

	start := time.Now()
	if _, err := h.srv.Revoke(ctx, "", serialOf(stolen), "test"); err != nil {
		t.Fatal(err)
	}
	if err := s.ended(t); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stream of a revoked certificate ended with %v, want PermissionDenied", err)
	}
	t.Logf("stream ended %s after Revoke", time.Since(start))
	for name, v := range map[string]*x509svid.SVID{"revoked": stolen, "served on its stream": renewed} {
		if leaf, err := fetchDefault(ctx, dialTCP(t, h, v)); err == nil {
			t.Errorf("the %s certificate still gets SVIDs on a new connection: %s", name, leaf.SerialNumber.Text(16))
		}
	}
	select {
	case err := <-bystander.errs:
		bystander.errs <- err
		t.Fatalf("a token caller's stream ended too: %v", err)
	default:
	}
	bearer := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	if leaf, err := fetchDefault(bearer, dialTCP(t, h, nil)); err != nil || leaf.URIs[0].String() != idB {
		t.Fatalf("a join token after the revocation: %v", err)
	}
}

// TestRevokedIdentityEndsRemoteStreams: revoking a SPIFFE ID ends the
// streams of every remote caller holding it, by certificate or token.
func TestRevokedIdentityEndsRemoteStreams(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	byCert, _ := remoteStream(t, h, mintSVID(t, h, idB))
	tok, _, err := h.srv.CreateJoinToken(ctx, idB, time.Hour, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	byToken := openSotW(t, dialTCPToken(t, h, tok), "token-proxy", "default")
	byToken.ack(byToken.recv())
	if _, err := h.srv.Revoke(ctx, idB, "", "test"); err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]*sotw{"certificate": byCert, "token": byToken} {
		if err := s.ended(t); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s stream of a revoked identity ended with %v, want PermissionDenied", name, err)
		}
	}
}

// TestRESTRefusesRenewalsOfARevokedCert: over REST SDS, what a revoked
// certificate was served is refused on the next request.
func TestRESTRefusesRenewalsOfARevokedCert(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	url := "https://" + h.listen.SDSRESTAddr + sds.RESTPath
	body, _ := protojson.Marshal(&discoveryv3.DiscoveryRequest{Node: envoyNode("rest"), ResourceNames: []string{"default"}, TypeUrl: sds.SecretTypeURL})
	post := func(v *x509svid.SVID) (*tlsv3.Secret, error) {
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS(h, v)}, Timeout: 30 * time.Second}
		defer client.CloseIdleConnections()
		resp, err := client.Post(url, "application/json", bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return nil, &httpError{resp.StatusCode, string(out)}
		}
		var dr discoveryv3.DiscoveryResponse
		if err := protojson.Unmarshal(out, &dr); err != nil {
			return nil, err
		}
		if len(dr.GetResources()) != 1 {
			return nil, &httpError{resp.StatusCode, "want one resource: " + string(out)}
		}
		var sec tlsv3.Secret
		if err := dr.GetResources()[0].UnmarshalTo(&sec); err != nil {
			return nil, err
		}
		return &sec, nil
	}
	stolen := mintSVID(t, h, idB)
	sec, err := post(stolen)
	if err != nil {
		t.Fatal(err)
	}
	renewed := svidOfSecret(t, sec)
	if _, err := h.srv.Revoke(ctx, "", serialOf(stolen), "test"); err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]*x509svid.SVID{"revoked": stolen, "served for it": renewed} {
		if _, err := post(v); err == nil {
			t.Errorf("REST SDS answered the %s certificate after the revocation", name)
		}
	}
}

type httpError struct {
	code int
	body string
}

func (e *httpError) Error() string { return http.StatusText(e.code) + ": " + e.body }

// TestEntryDeleteReachesRemoteRenewals: an SVID issued under an entry and
// then renewed over TCP SDS is recorded under that entry; deleting the
// entry revokes the renewals and ends the remote stream.
func TestEntryDeleteReachesRemoteRenewals(t *testing.T) {
	h := startServer(t, time.Hour)
	ctx := context.Background()
	local := openSotW(t, dialSDS(t, h.socket), "local", "default")
	r := local.recv()
	local.ack(r)
	issued := svidOfSecret(t, secrets(t, r, "default")["default"])
	remote, renewed := remoteStream(t, h, issued)

	entries, _, err := h.srv.ListEntries(ctx, store.EntryQuery{})
	if err != nil || len(entries) != 1 {
		t.Fatalf("entries: %v %v", entries, err)
	}
	entryID := entries[0].ID
	rows, _, err := h.srv.Store().ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range rows {
		if row.Serial == serialOf(renewed) && row.EntryID != entryID {
			t.Errorf("the remote renewal is recorded under entry %q, want %q", row.EntryID, entryID)
		}
	}

	_, revoked, err := h.srv.DeleteEntry(ctx, entryID, "test")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, r := range revoked {
		got[r.Serial] = true
	}
	if !got[serialOf(issued)] || !got[serialOf(renewed)] {
		t.Fatalf("deleting the entry revoked %v, want %s and its remote renewal %s", revoked, serialOf(issued), serialOf(renewed))
	}
	if err := remote.ended(t); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("remote stream after its entry was deleted: %v, want PermissionDenied", err)
	}
	if _, err := fetchDefault(ctx, dialTCP(t, h, renewed)); err == nil {
		t.Fatal("the remote renewal of a deleted entry still gets SVIDs")
	}
}

// bearerCreds sends a join token on every RPC, as Envoy's SDS cluster does
// with initial_metadata.
type bearerCreds string

func (b bearerCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearerCreds) RequireTransportSecurity() bool { return true }

func dialTCPToken(t *testing.T, h *harness, tok string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(h.listen.SDSAddr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(h, nil))), grpc.WithPerRPCCredentials(bearerCreds(tok)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}
