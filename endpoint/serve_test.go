package endpoint_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/sds"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const waitLong = 20 * time.Second

var testID = spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/web")

// tinySource serves one SVID to callers whose attested selectors include
// this process's uid, and nothing to anyone else, so a socket that did not
// authenticate with the attestors serves nothing.
type tinySource struct {
	snap *identity.Snapshot
	want string // the selector a caller must have

	mu      sync.Mutex
	callers [][]string
}

func newTinySource(t *testing.T) *tinySource {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{testID.TrustDomain().ID().URL()},
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(30 * time.Minute),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{testID.URL()},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return &tinySource{
		want: "unix:uid:" + strconv.Itoa(os.Geteuid()),
		snap: &identity.Snapshot{
			SVIDs: []*identity.SVID{{
				ID: testID, Certs: []*x509.Certificate{leaf},
				ChainPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
				Key:      crypto.Signer(key),
				KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
				KeyDER:   keyDER, Serial: "02", NotAfter: leaf.NotAfter,
			}},
			Bundles: []*identity.Bundle{{TrustDomain: testID.TrustDomain(), X509Authorities: []*x509.Certificate{ca}, PEM: caPEM, Version: "1"}},
		},
	}
}

func (s *tinySource) Subscribe(_ context.Context, c identity.Caller) (identity.Subscription, error) {
	s.mu.Lock()
	s.callers = append(s.callers, c.Selectors)
	s.mu.Unlock()
	if !slices.Contains(c.Selectors, s.want) {
		return &staticSub{snap: &identity.Snapshot{}}, nil
	}
	return &staticSub{snap: s.snap}, nil
}

func (s *tinySource) MintJWTSVID(context.Context, identity.Caller, []string, string) ([]*identity.JWTSVID, error) {
	return nil, identity.ErrNotEntitled
}

type staticSub struct{ snap *identity.Snapshot }

func (s *staticSub) Snapshot() *identity.Snapshot { return s.snap }
func (s *staticSub) Changed() <-chan struct{}     { return nil }
func (s *staticSub) Close()                       {}

// shortDir is a directory for sockets (t.TempDir can exceed the 107-byte
// socket path limit).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ep-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// serveWorkload listens and serves in the background; the returned
// function cancels and returns Serve's result and how long the drain took.
func serveWorkload(t *testing.T, opts endpoint.WorkloadOptions) (*endpoint.WorkloadServer, func() (error, time.Duration)) {
	t.Helper()
	w, err := endpoint.ListenWorkload(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Serve(ctx) }()
	var once sync.Once
	var res error
	var took time.Duration
	stop := func() (error, time.Duration) {
		once.Do(func() {
			start := time.Now()
			cancel()
			select {
			case res = <-done:
			case <-time.After(2 * waitLong):
				t.Fatal("Serve did not return")
			}
			took = time.Since(start)
		})
		return res, took
	}
	t.Cleanup(func() { stop() })
	return w, stop
}

func dial(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func openSDS(ctx context.Context, t *testing.T, conn *grpc.ClientConn) (secretv3.SecretDiscoveryService_StreamSecretsClient, *discoveryv3.DiscoveryResponse) {
	t.Helper()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "envoy"}, TypeUrl: sds.SecretTypeURL, ResourceNames: []string{sds.NameDefault}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("SDS: %v", err)
	}
	return stream, resp
}

// One socket answers a go-spiffe client and an Envoy-style SDS stream,
// each caller authenticated by the attestor set (its uid selector), and
// reports health for both services.
func TestWorkloadSocketServesSDSAndWorkloadAPI(t *testing.T) {
	src := newTinySource(t)
	socket := filepath.Join(shortDir(t), "w", "workload.sock")
	w, _ := serveWorkload(t, endpoint.WorkloadOptions{Socket: socket, Source: src})
	if w.Socket() != socket {
		t.Fatalf("Socket() = %q, want %q", w.Socket(), socket)
	}
	fi, err := os.Lstat(socket)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != endpoint.PublicSocketPerm {
		t.Fatalf("socket %s: %v %v, want a %04o socket", socket, fi.Mode(), err, endpoint.PublicSocketPerm)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()

	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	if svid.ID != testID {
		t.Errorf("FetchX509SVID: %s, want %s", svid.ID, testID)
	}

	conn := dial(t, socket)
	stream, resp := openSDS(ctx, t, conn)
	defer stream.CloseSend()
	if len(resp.GetResources()) != 1 {
		t.Fatalf("SDS: %d resources, want 1", len(resp.GetResources()))
	}
	var sec tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&sec); err != nil {
		t.Fatal(err)
	}
	chain := sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes()
	if sec.GetName() != sds.NameDefault || string(chain) != string(src.snap.SVIDs[0].ChainPEM) {
		t.Errorf("SDS secret %q with chain %q, want %q with the SVID's", sec.GetName(), chain, sds.NameDefault)
	}

	for _, name := range []string{"", "envoy.service.secret.v3.SecretDiscoveryService", "SpiffeWorkloadAPI"} {
		r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q: %v %v, want SERVING", name, r.GetStatus(), err)
		}
	}

	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.callers) < 2 {
		t.Fatalf("source saw %d callers, want one per API", len(src.callers))
	}
	for _, sels := range src.callers {
		if !slices.Contains(sels, src.want) {
			t.Errorf("caller selectors %v lack %s", sels, src.want)
		}
	}
}

// Cancelling Serve's context ends open streams cleanly (not by the drain
// timeout's hard stop), returns nil well within DrainTimeout and removes
// the socket file.
func TestWorkloadServeDrainsOnCancel(t *testing.T) {
	src := newTinySource(t)
	socket := filepath.Join(shortDir(t), "workload.sock")
	const drain = 3 * waitLong // far beyond what a clean drain takes
	_, stop := serveWorkload(t, endpoint.WorkloadOptions{Socket: socket, Source: src, DrainTimeout: drain})
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	stream, _ := openSDS(ctx, t, dial(t, socket))

	ended := make(chan error, 1)
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				ended <- err
				return
			}
		}
	}()
	err, took := stop()
	if err != nil {
		t.Fatalf("Serve: %v, want nil", err)
	}
	if took >= waitLong {
		t.Errorf("drain took %s: the open stream was not ended, only cut at the timeout", took)
	}
	select {
	case err := <-ended:
		if !errors.Is(err, io.EOF) {
			t.Errorf("open SDS stream ended with %v, want a clean end (EOF)", err)
		}
	case <-time.After(waitLong):
		t.Fatal("open SDS stream did not end")
	}
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Serve: %v, want removed", err)
	}
	if c, err := net.Dial("unix", socket); err == nil {
		c.Close()
		t.Error("socket still accepts after Serve returned")
	}
}

// The socket's path goes through ListenUnix's directory checks: a
// directory another user owns is refused, the error naming it.
func TestListenWorkloadRefusesDirectoryOfAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown a directory to another uid")
	}
	dir := filepath.Join(shortDir(t), "theirs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "workload.sock")
	w, err := endpoint.ListenWorkload(endpoint.WorkloadOptions{Socket: socket, Source: newTinySource(t)})
	if err == nil {
		w.Close()
		t.Fatal("ListenWorkload in a directory owned by uid 65534 succeeded")
	}
	if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "65534") {
		t.Errorf("error %q does not name the directory %s and its owner", err, dir)
	}
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after the refusal: %v, want none", err)
	}
}

// Close on a server never served releases the socket, so a new server can
// take the path at once.
func TestWorkloadCloseWithoutServe(t *testing.T) {
	socket := filepath.Join(shortDir(t), "workload.sock")
	w, err := endpoint.ListenWorkload(endpoint.WorkloadOptions{Socket: socket, Source: newTinySource(t)})
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Close: %v, want removed", err)
	}
	if err := w.Serve(context.Background()); err == nil {
		t.Error("Serve after Close returned nil, want an error")
	}
}
