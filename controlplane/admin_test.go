package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/identity"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// testServer is a real server on a real unix socket in a temp dir.
type testServer struct {
	srv    *Server
	client adminv1.AdminServiceClient
	socket string
	dir    string
	stop   func()
}

func startServer(t *testing.T, cfg Config) *testServer {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	srv, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	// Unix socket paths are limited to 108 bytes; t.TempDir() can be long.
	sockDir, err := os.MkdirTemp("", "meshid-test-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(sockDir, "admin.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: socket}, func(Listening) { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	ts := &testServer{srv: srv, client: adminv1.NewAdminServiceClient(conn), socket: socket, dir: cfg.DataDir}
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
			os.RemoveAll(sockDir)
		})
	}
	t.Cleanup(ts.stop)
	return ts
}

func csrFor(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// snapshot is everything a failed request must leave untouched.
type snapshot struct {
	entries, certs, audit int
}

func (ts *testServer) snapshot(t *testing.T) snapshot {
	t.Helper()
	ctx := context.Background()
	entries, _, err := ts.srv.store.ListEntries(ctx, store.EntryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	certs, _, err := ts.srv.store.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	audit, err := ts.srv.store.ListAudit(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	return snapshot{len(entries), len(certs), len(audit)}
}

func TestAdminSocketIsOwnerOnly(t *testing.T) {
	ts := startServer(t, Config{})
	fi, err := os.Stat(ts.socket)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Fatalf("admin socket mode %o, want 600", perm)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is not a socket", ts.socket)
	}
}

func TestEntryLifecycle(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := context.Background()
	resp, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
		SpiffeId:  "spiffe://cluster.local/ns/shop/sa/web",
		Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}, {Type: "unix", Value: "path:/usr/bin/web"}},
		DnsNames:  []string{"web.shop.svc"},
		Ttl:       durationpb.New(time.Hour),
	}})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	id := resp.GetEntry().GetId()
	if id == "" {
		t.Fatal("created entry has no id")
	}
	list, err := ts.client.ListEntries(ctx, &adminv1.ListEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetEntries()) != 1 || list.GetEntries()[0].GetId() != id {
		t.Fatalf("list = %v, want the one entry %s", list.GetEntries(), id)
	}
	got := list.GetEntries()[0]
	if got.GetTtl().AsDuration() != time.Hour || len(got.GetSelectors()) != 2 || got.GetDnsNames()[0] != "web.shop.svc" {
		t.Fatalf("entry round trip lost fields: %v", got)
	}
	// The caller with both selectors matches; with one of them it does not.
	if m := ts.srv.MatchEntries([]string{"unix:uid:1000", "unix:path:/usr/bin/web", "unix:gid:5"}); len(m) != 1 || m[0].ID != id {
		t.Fatalf("match with all selectors = %v", m)
	}
	if m := ts.srv.MatchEntries([]string{"unix:uid:1000"}); len(m) != 0 {
		t.Fatalf("match with a subset of selectors = %v, want none", m)
	}
	if _, err := ts.client.DeleteEntry(ctx, &adminv1.DeleteEntryRequest{Id: id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if m := ts.srv.MatchEntries([]string{"unix:uid:1000", "unix:path:/usr/bin/web"}); len(m) != 0 {
		t.Fatalf("deleted entry still matches: %v", m)
	}
	audit, err := ts.srv.store.ListAudit(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, a := range audit {
		actions = append(actions, a.Action)
	}
	// Newest first: delete, create, then the keys made on first start.
	if len(actions) != 4 || actions[0] != "entry.delete" || actions[1] != "entry.create" || actions[2] != "jwt.create" || actions[3] != "ca.create" {
		t.Fatalf("audit trail = %v", actions)
	}
}

func TestBadRequestsChangeNothing(t *testing.T) {
	ts := startServer(t, Config{CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	ctx := context.Background()
	web := "spiffe://cluster.local/ns/shop/sa/web"
	sel := []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}}
	if _, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: sel}}); err != nil {
		t.Fatal(err)
	}
	goodCSR := csrFor(t)
	tampered := append([]byte(nil), goodCSR...)
	tampered[len(tampered)-5] ^= 0xff // inside the signature

	tests := []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"entry with invalid spiffe id", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: "not a uri", Selectors: sel}})
			return err
		}, codes.InvalidArgument},
		{"entry in a foreign trust domain", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: "spiffe://evil.example/ns/x/sa/y", Selectors: sel}})
			return err
		}, codes.InvalidArgument},
		{"entry for the trust domain itself", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: "spiffe://cluster.local", Selectors: sel}})
			return err
		}, codes.InvalidArgument},
		{"entry with an unknown selector type", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: []*adminv1.Selector{{Type: "docker", Value: "image:x"}}}})
			return err
		}, codes.InvalidArgument},
		{"entry with a non-numeric uid", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:root"}}}})
			return err
		}, codes.InvalidArgument},
		{"entry without selectors", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web}})
			return err
		}, codes.InvalidArgument},
		{"entry with ttl beyond the CA", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web + "2", Selectors: sel, Ttl: durationpb.New(72 * time.Hour)}})
			return err
		}, codes.InvalidArgument},
		{"entry with a bad dns name", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web + "3", Selectors: sel, DnsNames: []string{"bad name!"}}})
			return err
		}, codes.InvalidArgument},
		{"duplicate entry", func() error {
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: sel}})
			return err
		}, codes.AlreadyExists},
		{"delete a missing entry", func() error {
			_, err := ts.client.DeleteEntry(ctx, &adminv1.DeleteEntryRequest{Id: "no-such-entry"})
			return err
		}, codes.NotFound},
		{"mint with ttl beyond the CA", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, Csr: goodCSR, Ttl: durationpb.New(72 * time.Hour)})
			return err
		}, codes.InvalidArgument},
		{"mint with a malformed csr", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, Csr: []byte("garbage")})
			return err
		}, codes.InvalidArgument},
		{"mint with a wrongly signed csr", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, Csr: tampered})
			return err
		}, codes.InvalidArgument},
		{"mint for a foreign trust domain", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://evil.example/x", Csr: goodCSR})
			return err
		}, codes.InvalidArgument},
		{"mint with an unknown key type", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, KeyType: "dsa-1024"})
			return err
		}, codes.InvalidArgument},
		{"mint with a negative ttl", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, Csr: goodCSR, Ttl: durationpb.New(-time.Hour)})
			return err
		}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := ts.snapshot(t)
			err := tt.call()
			if status.Code(err) != tt.code {
				t.Fatalf("got %v, want code %v", err, tt.code)
			}
			if msg := status.Convert(err).Message(); msg == "" || len(msg) > 300 {
				t.Fatalf("reason %q should be one short line", msg)
			}
			if after := ts.snapshot(t); after != before {
				t.Fatalf("store changed by a failed request: before %+v after %+v", before, after)
			}
		})
	}
}

func TestMintFromCSRVerifiesAndIsRecorded(t *testing.T) {
	ts := startServer(t, Config{SVIDTTL: 2 * time.Hour})
	ctx := context.Background()
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	resp, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: id.String(), Csr: csrFor(t)})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetPrivateKey()) != 0 {
		t.Fatal("server returned a private key for a CSR request")
	}
	leaf, err := x509.ParseCertificate(resp.GetCertChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got < 2*time.Hour || got > 2*time.Hour+time.Minute {
		t.Fatalf("validity %s, want the server's 2h svid ttl", got)
	}
	bundle := x509bundle.New(id.TrustDomain())
	for _, der := range resp.GetBundle() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		bundle.AddX509Authority(c)
	}
	gotID, _, err := x509svid.Verify([]*x509.Certificate{leaf}, bundle)
	if err != nil {
		t.Fatalf("go-spiffe rejects the SVID: %v", err)
	}
	if gotID != id {
		t.Fatalf("SVID id %s, want %s", gotID, id)
	}
	rows, _, err := ts.srv.store.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Serial != resp.GetSerial() || rows[0].SpiffeID != id.String() || rows[0].Requester == "" {
		t.Fatalf("inventory = %+v, want the one SVID %s with its requester", rows, resp.GetSerial())
	}
	certs, err := ts.client.ListCerts(ctx, &adminv1.ListCertsRequest{ExpiringWithin: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if len(certs.GetCerts()) != 0 {
		t.Fatalf("a 2h SVID is listed as expiring within 1h")
	}
	certs, err = ts.client.ListCerts(ctx, &adminv1.ListCertsRequest{ExpiringWithin: durationpb.New(3 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if len(certs.GetCerts()) != 1 {
		t.Fatalf("expiring within 3h: %d certs, want 1", len(certs.GetCerts()))
	}
}

func TestDefaultTTLIsClampedToTheCA(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	dir := t.TempDir()
	// A 48h CA seen 45h later has 3h left: a default 6h SVID must stop
	// when the CA does, not outlive it.
	cfg := Config{DataDir: dir, CATTL: 48 * time.Hour, SVIDTTL: 6 * time.Hour, DisableAutoRotate: true, Now: clock}
	ts := startServer(t, cfg)
	caNotAfter := ts.srv.BundleCerts()[0].NotAfter
	ts.stop()
	later := now.Add(45 * time.Hour)
	cfg.Now = func() time.Time { return later }
	ts = startServer(t, cfg)
	resp, err := ts.client.MintX509SVID(context.Background(), &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://cluster.local/a", Csr: csrFor(t)})
	if err != nil {
		t.Fatal(err)
	}
	if na := resp.GetNotAfter().AsTime(); na.After(caNotAfter) {
		t.Fatalf("SVID not after %s outlives the CA %s", na, caNotAfter)
	}
	// The same for SVIDs served to workloads (renewals), whose TTL is
	// clamped at the moment of signing, not refused.
	if _, err := ts.srv.CreateEntry(context.Background(), EntrySpec{SpiffeID: "spiffe://cluster.local/w", Selectors: []store.Selector{{Type: "unix", Value: "uid:77"}}}, "t"); err != nil {
		t.Fatal(err)
	}
	sub, err := ts.srv.Subscribe(context.Background(), identity.Caller{Selectors: []string{"unix:uid:77"}})
	if err != nil {
		t.Fatalf("serving a workload near the CA's end: %v", err)
	}
	defer sub.Close()
	if na := sub.Snapshot().SVIDs[0].NotAfter; na.After(caNotAfter) {
		t.Fatalf("served SVID not after %s outlives the CA %s", na, caNotAfter)
	}
}

func TestRestartKeepsCAAndEntries(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir})
	ctx := context.Background()
	b1, err := ts.client.GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
		SpiffeId: "spiffe://cluster.local/ns/a/sa/b", Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:7"}},
	}}); err != nil {
		t.Fatal(err)
	}
	ts.stop()

	ts = startServer(t, Config{DataDir: dir})
	b2, err := ts.client.GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(b1.GetX509Authorities()) != 1 || string(b1.GetX509Authorities()[0]) != string(b2.GetX509Authorities()[0]) {
		t.Fatal("the CA changed across a restart")
	}
	if m := ts.srv.MatchEntries([]string{"unix:uid:7"}); len(m) != 1 {
		t.Fatalf("entry lost across restart: %v", m)
	}
	// The key was sealed: the raw CA key bytes must not be in the store file.
	cas, err := ts.srv.store.ListCAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := ts.srv.activeCA()
	der, err := x509.MarshalPKCS8PrivateKey(a.Key)
	if err != nil {
		t.Fatal(err)
	}
	if string(cas[0].SealedKey) == string(der) || len(cas[0].SealedKey) == 0 {
		t.Fatal("CA key stored in the clear")
	}
}

func TestWrongKEKRefusesToStart(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir})
	ts.stop()
	other := filepath.Join(t.TempDir(), "other-kek")
	_, err := Open(context.Background(), Config{DataDir: dir, KEKFile: other})
	if err == nil {
		t.Fatal("opened a data dir with a different key-encryption key")
	}
}

func TestTrustDomainMismatchRefusesToStart(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir})
	ts.stop()
	_, err := Open(context.Background(), Config{DataDir: dir, TrustDomain: "other.example"})
	if err == nil {
		t.Fatal("opened a data dir whose CA is for another trust domain")
	}
}
