package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

// subSource adapts a live subscription to go-spiffe's SVID and bundle
// sources, as a workload using the Workload API would hold them.
type subSource struct{ sub identity.Subscription }

func (s subSource) GetX509SVID() (*x509svid.SVID, error) {
	snap := s.sub.Snapshot()
	if len(snap.SVIDs) == 0 {
		return nil, errors.New("no svid")
	}
	v := snap.SVIDs[0]
	return &x509svid.SVID{ID: v.ID, Certificates: v.Certs, PrivateKey: v.Key}, nil
}

func (s subSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b := s.sub.Snapshot().BundleFor(td)
	if b == nil {
		return nil, fmt.Errorf("no bundle for %s", td)
	}
	return x509bundle.FromX509Authorities(td, b.X509Authorities), nil
}

// TestHandshakesThroughTwoAutomaticRotations runs the CA lifecycle on the
// wall clock with short TTLs (CA 25 s, SVID 4 s: prepare at 12.5 s, activate once the
// prepared CA has been published for 2 x SVID TTL) while two workloads do
// mTLS handshakes back to back. Not one may fail, and the bundle each holds
// must always contain the CA that signed the peer's certificate.
func TestHandshakesThroughTwoAutomaticRotations(t *testing.T) {
	// A soak: two real CA rotations take ~35 s, so it runs when
	// MESHID_SOAK=1 (make test sets it); the same lifecycle in fake time is
	// TestTwoAutomaticRotationsOnFakeClock, which always runs.
	if testing.Short() || os.Getenv("MESHID_SOAK") != "1" {
		t.Skip("real-time soak (two CA rotations, ~35 s): set MESHID_SOAK=1")
	}
	ts := startServer(t, Config{SVIDTTL: 4 * time.Second, CATTL: 25 * time.Second})
	ctx := context.Background()
	idA, idB := "spiffe://cluster.local/ns/a/sa/server", "spiffe://cluster.local/ns/b/sa/client"
	for id, sel := range map[string]string{idA: "uid:1001", idB: "uid:1002"} {
		if _, err := ts.srv.CreateEntry(ctx, EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: sel}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	subA, err := ts.srv.Subscribe(ctx, identity.Caller{Selectors: []string{"unix:uid:1001"}})
	if err != nil {
		t.Fatal(err)
	}
	defer subA.Close()
	subB, err := ts.srv.Subscribe(ctx, identity.Caller{Selectors: []string{"unix:uid:1002"}})
	if err != nil {
		t.Fatal(err)
	}
	defer subB.Close()
	firstCA := ts.srv.BundleCerts()[0]

	var missingSigner atomic.Int64
	// checkSigner records any moment a holder's bundle lacks the CA that
	// signed the peer's leaf.
	checkSigner := func(src subSource) func([][]byte, [][]*x509.Certificate) error {
		return func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			for _, c := range src.sub.Snapshot().Bundles[0].X509Authorities {
				if leaf.CheckSignatureFrom(c) == nil {
					return nil
				}
			}
			missingSigner.Add(1)
			return errors.New("bundle lacks the peer's signing CA")
		}
	}
	srvCfg := tlsconfig.MTLSServerConfig(subSource{subA}, subSource{subA}, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idB)))
	srvCfg.MinVersion = tls.VersionTLS13
	srvCfg.VerifyPeerCertificate = chainVerify(srvCfg.VerifyPeerCertificate, checkSigner(subSource{subA}))
	lis, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
				_, _ = c.Write([]byte("ok"))
			})
		}
	})
	cliCfg := tlsconfig.MTLSClientConfig(subSource{subB}, subSource{subB}, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idA)))
	cliCfg.MinVersion = tls.VersionTLS13
	cliCfg.VerifyPeerCertificate = chainVerify(cliCfg.VerifyPeerCertificate, checkSigner(subSource{subB}))

	// Handshake until two activations have happened and the first CA has
	// left the bundle; bounded by a deadline for a broken run.
	deadline := time.Now().Add(90 * time.Second)
	var ok, failed int
	var firstErr error
	signers := map[string]bool{}
	for time.Now().Before(deadline) {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), cliCfg)
		if err == nil {
			buf := make([]byte, 2)
			_, err = conn.Read(buf)
			if err == nil {
				signers[string(conn.ConnectionState().PeerCertificates[0].AuthorityKeyId)] = true
			}
			conn.Close()
		}
		if err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
		} else {
			ok++
		}
		if activations(t, ts.srv) >= 2 && !containsCert(ts.srv.BundleCerts(), firstCA) && len(signers) >= 3 {
			break
		}
	}
	lis.Close()
	wg.Wait()
	if n := activations(t, ts.srv); n < 2 {
		t.Fatalf("%d automatic activations within the deadline, want 2", n)
	}
	if containsCert(ts.srv.BundleCerts(), firstCA) {
		t.Fatal("the first CA never left the bundle after its last SVID expired")
	}
	if failed > 0 || missingSigner.Load() > 0 {
		t.Fatalf("%d of %d handshakes failed through the rotations (first: %v); %d times a bundle lacked the peer's CA",
			failed, ok+failed, firstErr, missingSigner.Load())
	}
	if len(signers) < 3 {
		t.Fatalf("server certificates came from %d CAs, want all 3", len(signers))
	}
	t.Logf("%d handshakes, 0 failed, across %d CAs", ok, len(signers))
}

func chainVerify(a, b func([][]byte, [][]*x509.Certificate) error) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, chains [][]*x509.Certificate) error {
		if a != nil {
			if err := a(raw, chains); err != nil {
				return err
			}
		}
		return b(raw, chains)
	}
}

func containsCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range certs {
		if x.Equal(c) {
			return true
		}
	}
	return false
}

func activations(t *testing.T, s *Server) int {
	t.Helper()
	ev, err := s.store.ListAudit(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ev {
		if e.Action == "ca.activate" {
			n++
		}
	}
	return n
}

func TestRestartResumesRotation(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	cfg := Config{DataDir: dir, DisableAutoRotate: true}
	ts := startServer(t, cfg)
	oldID := ts.srv.activeID
	// An SVID from the old CA keeps it in the bundle after it retires.
	if _, err := ts.srv.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/a", Requester: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.srv.PrepareCA(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.srv.PrepareCA(ctx, "test"); err == nil {
		t.Fatal("a second prepare while one is pending was accepted")
	}
	var fp *FailedPreconditionError
	if _, err := ts.srv.ActivateCA(ctx, "test", false); !errors.As(err, &fp) {
		t.Fatalf("activation inside the publication window: %v, want FailedPrecondition", err)
	}
	ts.stop()

	// Restart with a prepared CA: still prepared, still published.
	ts = startServer(t, cfg)
	p := ts.srv.preparedCA()
	if p == nil || len(ts.srv.BundleCerts()) != 2 || ts.srv.activeID != oldID {
		t.Fatalf("after restart: prepared=%v bundle=%d active=%s", p != nil, len(ts.srv.BundleCerts()), ts.srv.activeID)
	}
	newID := p.rec.ID
	if _, err := ts.srv.ActivateCA(ctx, "test", true); err != nil {
		t.Fatal(err)
	}
	ts.stop()

	// Restart after activation: new active, old retired but still trusted
	// (its SVID is live).
	ts = startServer(t, cfg)
	if ts.srv.activeID != newID || len(ts.srv.BundleCerts()) != 2 {
		t.Fatalf("after restart: active %s (want %s), bundle %d", ts.srv.activeID, newID, len(ts.srv.BundleCerts()))
	}
	// Simulate a crash between the two writes of an activation: the old CA
	// active again beside the new one. The newer must win.
	old := ts.srv.caByID(oldID).rec
	old.State = store.CAActive
	if err := ts.srv.store.PutCA(ctx, old, nil); err != nil {
		t.Fatal(err)
	}
	ts.stop()
	ts = startServer(t, cfg)
	if ts.srv.activeID != newID || ts.srv.caByID(oldID).rec.State != store.CARetired {
		t.Fatalf("interrupted activation not repaired: active %s, old %s", ts.srv.activeID, ts.srv.caByID(oldID).rec.State)
	}
}
