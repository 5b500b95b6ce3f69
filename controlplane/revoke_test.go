package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// crlPeer is a TLS server that, like Envoy with the pushed crl, refuses a
// client certificate on the CRLs of its latest snapshot.
type crlPeer struct {
	lis net.Listener
	wg  sync.WaitGroup
}

func startCRLPeer(t testing.TB, sub identity.Subscription, allow ...string) *crlPeer {
	var ids []spiffeid.ID
	for _, a := range allow {
		ids = append(ids, spiffeid.RequireFromString(a))
	}
	cfg := tlsconfig.MTLSServerConfig(subSource{sub}, subSource{sub}, tlsconfig.AuthorizeOneOf(ids...))
	cfg.MinVersion = tls.VersionTLS13
	cfg.VerifyPeerCertificate = chainVerify(cfg.VerifyPeerCertificate, func(raw [][]byte, _ [][]*x509.Certificate) error {
		leaf, err := x509.ParseCertificate(raw[0])
		if err != nil {
			return err
		}
		b := sub.Snapshot().Bundles[0]
		for _, issuer := range b.X509Authorities {
			if leaf.CheckSignatureFrom(issuer) != nil {
				continue
			}
			revoked, err := CheckCRLs(leaf, issuer, b.CRLs)
			if err != nil {
				return err
			}
			if revoked {
				return errors.New("certificate revoked")
			}
		}
		return nil
	})
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &crlPeer{lis: lis}
	p.wg.Go(func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			p.wg.Go(func() {
				defer c.Close()
				if c.(*tls.Conn).Handshake() == nil {
					_, _ = c.Write([]byte("ok"))
				}
			})
		}
	})
	t.Cleanup(func() { lis.Close(); p.wg.Wait() })
	return p
}

// dial does one mTLS exchange presenting svid; nil means accepted.
func (p *crlPeer) dial(svid *x509svid.SVID, bundle x509svidSource) error {
	cfg := tlsconfig.MTLSClientConfig(staticSVID{svid}, bundle, tlsconfig.AuthorizeAny())
	cfg.MinVersion = tls.VersionTLS13
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", p.lis.Addr().String(), cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	buf := make([]byte, 2)
	_, err = conn.Read(buf)
	return err
}

type staticSVID struct{ s *x509svid.SVID }

func (s staticSVID) GetX509SVID() (*x509svid.SVID, error) { return s.s, nil }

type x509svidSource = subSource

func svidOf(t testing.TB, sub identity.Subscription) *x509svid.SVID {
	t.Helper()
	snap := sub.Snapshot()
	if len(snap.SVIDs) == 0 {
		t.Fatal("no SVID")
	}
	v := snap.SVIDs[0]
	return &x509svid.SVID{ID: v.ID, Certificates: v.Certs, PrivateKey: v.Key}
}

func subscribeAs(t testing.TB, srv *Server, id, uid string) identity.Subscription {
	t.Helper()
	ctx := context.Background()
	if _, err := srv.CreateEntry(ctx, EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: "uid:" + uid}}}, "test"); err != nil {
		t.Fatal(err)
	}
	sub, err := srv.Subscribe(ctx, identity.Caller{Selectors: []string{"unix:uid:" + uid}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	return sub
}

// revokeToRefusal revokes the serial of stolen and returns how long until
// the peer refuses it.
func revokeToRefusal(t testing.TB, srv *Server, peer *crlPeer, stolen *x509svid.SVID, holder identity.Subscription) time.Duration {
	start := time.Now()
	if _, err := srv.Revoke(context.Background(), "", stolen.Certificates[0].SerialNumber.Text(16), "test"); err != nil {
		t.Fatal(err)
	}
	deadline := start.Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if peer.dial(stolen, subSource{holder}) != nil {
			return time.Since(start)
		}
	}
	t.Fatal("the revoked certificate was still accepted after 30s")
	return 0
}

func TestRevocationIsPushedAndApplied(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir, SVIDTTL: time.Hour})
	const a, b, c = "spiffe://cluster.local/ns/x/sa/a", "spiffe://cluster.local/ns/x/sa/b", "spiffe://cluster.local/ns/x/sa/c"
	subA := subscribeAs(t, ts.srv, a, "2001")
	subB := subscribeAs(t, ts.srv, b, "2002")
	subC := subscribeAs(t, ts.srv, c, "2003")
	peer := startCRLPeer(t, subA, b, c)

	stolen := svidOf(t, subB) // B's certificate, kept by an attacker
	if err := peer.dial(stolen, subSource{subB}); err != nil {
		t.Fatalf("B before revocation: %v", err)
	}
	if n := len(subA.Snapshot().Bundles[0].CRLs); n != 1 {
		t.Fatalf("%d CRLs in the bundle, want one (empty) per CA", n)
	}
	took := revokeToRefusal(t, ts.srv, peer, stolen, subB)
	t.Logf("revoked certificate refused %s after Revoke", took)

	// B itself gets a fresh certificate at once and keeps working; C is
	// untouched.
	fresh := svidOf(t, subB)
	for fresh.Certificates[0].SerialNumber.Cmp(stolen.Certificates[0].SerialNumber) == 0 {
		select {
		case <-subB.Changed():
		case <-time.After(30 * time.Second):
			t.Fatal("B was not re-issued a certificate after its serial was revoked")
		}
		fresh = svidOf(t, subB)
	}
	if err := peer.dial(fresh, subSource{subB}); err != nil {
		t.Fatalf("B with its new certificate: %v", err)
	}
	cOld := svidOf(t, subC)
	if err := peer.dial(cOld, subSource{subC}); err != nil {
		t.Fatalf("C: %v", err)
	}

	// Revoking an identity deletes its entries: C is no longer served, and
	// its certificate is refused.
	res, err := ts.srv.Revoke(context.Background(), c, "", "test")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.DeletedEntries) != 1 || len(res.Serials) != 1 {
		t.Fatalf("revoke by ID: %+v", res)
	}
	if len(subC.Snapshot().SVIDs) != 0 {
		t.Fatal("a revoked identity is still served")
	}
	if err := peer.dial(cOld, subSource{subC}); err == nil {
		t.Fatal("C's certificate accepted after its identity was revoked")
	}

	// Bad requests change nothing.
	before, err := ts.srv.store.ListRevoked(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var inv *InvalidArgumentError
	for _, bad := range []struct{ id, serial string }{{"", ""}, {a, "01"}, {"", "zz"}, {"spiffe://evil.example/x", ""}} {
		if _, err := ts.srv.Revoke(context.Background(), bad.id, bad.serial, "test"); !errors.As(err, &inv) {
			t.Errorf("Revoke(%q, %q): %v, want InvalidArgument", bad.id, bad.serial, err)
		}
	}
	if _, err := ts.srv.Revoke(context.Background(), "", "abcdef", "test"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("unknown serial: %v", err)
	}
	after, _ := ts.srv.store.ListRevoked(context.Background())
	if len(after) != len(before) {
		t.Fatal("a failed revocation changed the store")
	}

	// Revocations survive a restart.
	ts.stop()
	ts = startServer(t, Config{DataDir: dir, SVIDTTL: time.Hour})
	if !ts.srv.isRevoked(stolen.Certificates[0]) {
		t.Fatal("revocation lost across a restart")
	}
}

// TestRevokedSerialLeavesTheCRLWhenItExpires keeps CRLs small: once the
// revoked certificate has expired its entry goes, and the new CRL is pushed.
// On the fake clock: still listed at the certificate's NotAfter, gone from
// the pushed CRL one lifecycle tick (1 ms) later.
func TestRevokedSerialLeavesTheCRLWhenItExpires(t *testing.T) {
	fc := fakeclock.New(time.Now())
	ts := startServer(t, Config{SVIDTTL: time.Hour, CATTL: 48 * time.Hour, Now: fc.Now, AfterFunc: fc.AfterFunc})
	sub := subscribeAs(t, ts.srv, "spiffe://cluster.local/ns/x/sa/short", "3001")
	v := svidOf(t, sub)
	if _, err := ts.srv.Revoke(context.Background(), "", v.Certificates[0].SerialNumber.Text(16), "test"); err != nil {
		t.Fatal(err)
	}
	listed := func() bool {
		b := sub.Snapshot().Bundles[0]
		for _, issuer := range b.X509Authorities {
			if r, _ := CheckCRLs(v.Certificates[0], issuer, b.CRLs); r {
				return true
			}
		}
		return false
	}
	if !listed() {
		t.Fatal("revoked serial not on the CRL")
	}
	notAfter := v.Certificates[0].NotAfter
	fc.Advance(notAfter.Sub(fc.Now()))
	if !listed() {
		t.Fatalf("the serial left the CRL at %s, before its certificate expired", fc.Now())
	}
	fc.Advance(time.Millisecond)
	deadline := time.After(10 * time.Second)
	for listed() {
		select {
		case <-sub.Changed():
		case <-deadline:
			t.Fatalf("the revoked serial is still on the pushed CRL at %s, after it expired at %s", fc.Now(), notAfter)
		}
	}
}

// BenchmarkRevokeToRefusal: from Revoke to a peer applying the pushed CRL
// refusing the revoked certificate.
func BenchmarkRevokeToRefusal(b *testing.B) {
	srv, err := Open(context.Background(), Config{DataDir: b.TempDir(), SVIDTTL: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	holder := subscribeAs(b, srv, "spiffe://cluster.local/ns/x/sa/peer", "4000")
	peer := startCRLPeer(b, holder, "spiffe://cluster.local/ns/x/sa/victim")
	victim := subscribeAs(b, srv, "spiffe://cluster.local/ns/x/sa/victim", "4001")
	var total time.Duration
	i := 0
	for b.Loop() {
		b.StopTimer()
		stolen := svidOf(b, victim)
		for peer.dial(stolen, subSource{victim}) != nil { // wait for its renewal after the last round
			<-victim.Changed()
			stolen = svidOf(b, victim)
		}
		b.StartTimer()
		total += revokeToRefusal(b, srv, peer, stolen, victim)
		i++
	}
	b.ReportMetric(float64(total.Microseconds())/float64(i)/1000, "ms/revoke-to-refusal")
}

// TestEntryDeleteRevokes: deleting an entry stops renewal and puts its live
// serials on the CRL, so the identity dies now.
func TestEntryDeleteRevokes(t *testing.T) {
	ts := startServer(t, Config{SVIDTTL: time.Hour})
	const a, d = "spiffe://cluster.local/ns/x/sa/a", "spiffe://cluster.local/ns/x/sa/d"
	subA := subscribeAs(t, ts.srv, a, "5001")
	subD := subscribeAs(t, ts.srv, d, "5002")
	peer := startCRLPeer(t, subA, d)
	held := svidOf(t, subD)
	if err := peer.dial(held, subSource{subD}); err != nil {
		t.Fatal(err)
	}
	entryID := ts.srv.entriesFor(d)[0].ID
	_, revoked, err := ts.srv.DeleteEntry(context.Background(), entryID, "test")
	if err != nil {
		t.Fatal(err)
	}
	if len(revoked) != 1 || revoked[0].Serial != held.Certificates[0].SerialNumber.Text(16) {
		t.Fatalf("deleting the entry revoked %+v, want its one live serial", revoked)
	}
	if len(subD.Snapshot().SVIDs) != 0 {
		t.Fatal("a deleted entry's identity is still served")
	}
	if err := peer.dial(held, subSource{subD}); err == nil {
		t.Fatal("the certificate of a deleted entry is still accepted")
	}
}
