package controlplane

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	workloadpb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/internal/fakeclock"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
)

// wlServer is a real server with its admin socket and its workload socket
// (SDS and the SPIFFE Workload API) in a temp dir.
type wlServer struct {
	*testServer
	wl string // workload socket
}

func startWorkloadServer(t *testing.T, cfg Config) *wlServer {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	srv, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	dir, err := os.MkdirTemp("", "meshid-crl-")
	if err != nil {
		t.Fatal(err)
	}
	admin, wl := filepath.Join(dir, "a.sock"), filepath.Join(dir, "w.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: admin, Socket: wl}, func(Listening) { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	conn := dialUnix(t, admin)
	var once sync.Once
	ts := &testServer{srv: srv, client: adminv1.NewAdminServiceClient(conn), socket: admin, dir: cfg.DataDir}
	ts.stop = func() {
		once.Do(func() {
			conn.Close()
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run returned %v", err)
			}
			if err := srv.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
			os.RemoveAll(dir)
		})
	}
	t.Cleanup(ts.stop)
	return &wlServer{testServer: ts, wl: wl}
}

func dialUnix(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// entryForMe gives this test process (by uid) spiffeID on the workload socket.
func entryForMe(t *testing.T, srv *Server, spiffeID string) {
	t.Helper()
	if _, err := srv.CreateEntry(context.Background(), EntrySpec{SpiffeID: spiffeID,
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "test"); err != nil {
		t.Fatal(err)
	}
}

// sdsWatch is an Envoy-like SotW SDS stream that ACKs every response.
type sdsWatch struct {
	t      *testing.T
	stream secretv3.SecretDiscoveryService_StreamSecretsClient
	names  []string
	node   *corev3.Node
}

func watchSDS(t *testing.T, socket string, names ...string) *sdsWatch {
	t.Helper()
	// A bound on the whole stream, so a push that never comes fails the
	// test instead of hanging it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	st, err := secretv3.NewSecretDiscoveryServiceClient(dialUnix(t, socket)).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &sdsWatch{t: t, stream: st, names: names, node: &corev3.Node{Id: "crl-test", Cluster: "test"}}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: w.node, ResourceNames: names, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	return w
}

// next returns the secrets of the next response, by name, and ACKs it.
func (w *sdsWatch) next() map[string]*tlsv3.Secret {
	w.t.Helper()
	resp, err := w.stream.Recv()
	if err != nil {
		w.t.Fatalf("sds recv: %v", err)
	}
	out := map[string]*tlsv3.Secret{}
	for _, a := range resp.GetResources() {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			w.t.Fatal(err)
		}
		out[s.GetName()] = &s
	}
	if err := w.stream.Send(&discoveryv3.DiscoveryRequest{Node: w.node, ResourceNames: w.names, TypeUrl: sds.SecretTypeURL,
		VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
		w.t.Fatal(err)
	}
	return out
}

// sdsCRLs parses the CRLs of a validation_context secret, as Envoy would.
func sdsCRLs(t *testing.T, s *tlsv3.Secret) []*x509.RevocationList {
	t.Helper()
	vc := s.GetValidationContext()
	if vc == nil {
		t.Fatalf("secret %s is not a validation_context", s.GetName())
	}
	var out []*x509.RevocationList
	rest := vc.GetCrl().GetInlineBytes()
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		rl, err := x509.ParseRevocationList(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, rl)
	}
	return out
}

// workloadX509 opens the SPIFFE Workload API X.509 stream (go-spiffe's
// generated client, for the crl field its high-level client drops).
func workloadX509(t *testing.T, socket string) workloadpb.SpiffeWorkloadAPI_FetchX509SVIDClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 2*time.Minute)
	t.Cleanup(cancel)
	st, err := workloadpb.NewSpiffeWorkloadAPIClient(dialUnix(t, socket)).FetchX509SVID(ctx, &workloadpb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func parseCRLs(t *testing.T, ders [][]byte) []*x509.RevocationList {
	t.Helper()
	var out []*x509.RevocationList
	for _, d := range ders {
		rl, err := x509.ParseRevocationList(d)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, rl)
	}
	return out
}

// TestCRLNextUpdateBoundedAndRefreshed: the pushed CRL's nextUpdate is a
// bounded interval ahead (24h here, not the CA's year), and on the fake
// clock a freshly signed CRL reaches the SDS and Workload API clients
// before the first one's nextUpdate passes, every time.
func TestCRLNextUpdateBoundedAndRefreshed(t *testing.T) {
	fc := fakeclock.New(time.Now())
	const svidTTL = time.Hour
	ts := startWorkloadServer(t, Config{SVIDTTL: svidTTL, Now: fc.Now, AfterFunc: fc.AfterFunc})
	entryForMe(t, ts.srv, "spiffe://cluster.local/ns/crl/sa/me")
	root := watchSDS(t, ts.wl, "ROOTCA")
	wl := workloadX509(t, ts.wl)

	check := func(rls []*x509.RevocationList, via string) time.Time {
		t.Helper()
		if len(rls) == 0 {
			t.Fatalf("%s: no CRL pushed", via)
		}
		now := fc.Now()
		for _, rl := range rls {
			ahead := rl.NextUpdate.Sub(now)
			if ahead > DefaultCRLValidity+time.Second || ahead < 2*svidTTL {
				t.Fatalf("%s: CRL nextUpdate %s is %s ahead; want at most %s and at least 2 x SVID TTL",
					via, rl.NextUpdate.Format(time.RFC3339), ahead, DefaultCRLValidity)
			}
			if rl.ThisUpdate.After(now) {
				t.Fatalf("%s: thisUpdate %s is in the future of %s", via, rl.ThisUpdate, now)
			}
		}
		return rls[0].NextUpdate
	}
	nextUpdate := check(sdsCRLs(t, root.next()["ROOTCA"]), "sds")
	first, err := wl.Recv()
	if err != nil {
		t.Fatal(err)
	}
	check(parseCRLs(t, first.GetCrl()), "workload api")

	// Three refresh periods: each time a new CRL arrives while the one in
	// hand is still current.
	for round := range 3 {
		fc.Advance(DefaultCRLValidity/2 + time.Second)
		if !fc.Now().Before(nextUpdate) {
			t.Fatal("test advanced past nextUpdate")
		}
		got := sdsCRLs(t, root.next()["ROOTCA"])
		if !got[0].NextUpdate.After(nextUpdate) {
			t.Fatalf("round %d: pushed CRL has nextUpdate %s, not after the previous %s", round, got[0].NextUpdate, nextUpdate)
		}
		nextUpdate = check(got, "sds")
		// The Workload API stream sees the same bundle change.
		for {
			r, err := wl.Recv()
			if err != nil {
				t.Fatal(err)
			}
			rls := parseCRLs(t, r.GetCrl())
			if len(rls) > 0 && rls[0].NextUpdate.Equal(nextUpdate) {
				check(rls, "workload api")
				break
			}
		}
	}
}

// TestCRLThisUpdateNotBeforeNewestRevocation: the CRL pushed after a
// revocation does not claim to predate it.
func TestCRLThisUpdateNotBeforeNewestRevocation(t *testing.T) {
	fc := fakeclock.New(time.Now().Truncate(time.Second).Add(400 * time.Millisecond))
	ts := startWorkloadServer(t, Config{SVIDTTL: time.Hour, Now: fc.Now, AfterFunc: fc.AfterFunc})
	ctx := context.Background()
	entryForMe(t, ts.srv, "spiffe://cluster.local/ns/crl/sa/me")
	minted, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://cluster.local/ns/crl/sa/other"})
	if err != nil {
		t.Fatal(err)
	}
	wl := workloadX509(t, ts.wl)
	if _, err := wl.Recv(); err != nil {
		t.Fatal(err)
	}
	fc.Advance(10 * time.Second)
	revokedAt := fc.Now() // not on a whole second: the encoding must round up
	if _, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{Serial: minted.GetSerial()}); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := wl.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, rl := range parseCRLs(t, r.GetCrl()) {
			if len(rl.RevokedCertificateEntries) == 0 {
				continue
			}
			newest := rl.RevokedCertificateEntries[0].RevocationTime
			for _, e := range rl.RevokedCertificateEntries {
				if e.RevocationTime.After(newest) {
					newest = e.RevocationTime
				}
			}
			if rl.ThisUpdate.Before(revokedAt) || rl.ThisUpdate.Before(newest) {
				t.Fatalf("CRL thisUpdate %s is before the revocation at %s (listed as %s)", rl.ThisUpdate, revokedAt, newest)
			}
			return
		}
	}
}

// TestRevokePastCRLBoundRefused: a revocation that would list more than
// MaxCRLSerials is refused with FailedPrecondition naming the emergency
// rotation, whichever way it comes (serial, SPIFFE ID, entry delete), and
// changes nothing; after 'ca rotate --now --drop-old' the old CA's
// revocations are gone and revoking works again.
func TestRevokePastCRLBoundRefused(t *testing.T) {
	ts := startServer(t, Config{SVIDTTL: time.Hour, MaxCRLSerials: 3})
	ctx := context.Background()
	const id = "spiffe://cluster.local/ns/bound/sa/many"
	var serials []string
	for range 5 {
		m, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: id})
		if err != nil {
			t.Fatal(err)
		}
		serials = append(serials, m.GetSerial())
	}
	for _, s := range serials[:3] {
		if _, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{Serial: s}); err != nil {
			t.Fatalf("revoke within the bound: %v", err)
		}
	}
	// Revoking a listed serial again adds nothing: still allowed.
	if _, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{Serial: serials[0]}); err != nil {
		t.Fatalf("re-revoking a listed serial: %v", err)
	}
	// A served SVID under an entry: deleting the entry would revoke it.
	subscribeAs(t, ts.srv, id, "7001")
	entryID := ts.srv.entriesFor(id)[0].ID
	before := ts.snapshot(t)
	revokedBefore, _ := ts.srv.store.ListRevoked(ctx)
	for name, call := range map[string]func() error{
		"serial": func() error {
			_, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{Serial: serials[3]})
			return err
		},
		"spiffe id": func() error {
			_, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{SpiffeId: id})
			return err
		},
	} {
		err := call()
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "meshid ca rotate --now") {
			t.Fatalf("revoke by %s past the bound: %v, want FailedPrecondition naming 'meshid ca rotate --now'", name, err)
		}
	}
	if _, err := ts.client.DeleteEntry(ctx, &adminv1.DeleteEntryRequest{Id: entryID}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("deleting an entry whose revocation exceeds the bound: %v, want FailedPrecondition", err)
	}
	if after := ts.snapshot(t); after != before {
		t.Fatalf("refused revocations changed the store: %+v -> %+v", before, after)
	}
	if revokedAfter, _ := ts.srv.store.ListRevoked(ctx); len(revokedAfter) != len(revokedBefore) {
		t.Fatal("refused revocations changed the revoked serials")
	}

	// The emergency rotation drops the old CA and its CRL: every serial
	// above is moot, and the bound has room again.
	rot, err := ts.client.RotateCA(ctx, &adminv1.RotateCARequest{DropOld: true})
	if err != nil {
		t.Fatal(err)
	}
	if rot.GetOld().GetState() != string(store.CARevoked) {
		t.Fatalf("old CA state %q after --drop-old, want revoked", rot.GetOld().GetState())
	}
	listed := 0
	ts.srv.pubMu.Lock()
	served := ts.srv.crl.served.DER
	ts.srv.pubMu.Unlock()
	for _, der := range served {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		listed += len(rl.RevokedCertificateEntries)
	}
	if listed != 0 {
		t.Fatalf("%d serials still on the CRLs after the old CA was dropped", listed)
	}
	if _, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{SpiffeId: id}); err != nil {
		t.Fatalf("revoke after the rotation: %v", err)
	}
}
