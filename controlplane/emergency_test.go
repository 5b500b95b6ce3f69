package controlplane

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/ca"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// gauge reads a gauge or counter from the server's registry.
func gauge(t *testing.T, s *Server, name string) float64 {
	t.Helper()
	mfs, err := s.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not exported", name)
	return 0
}

func caShow(t *testing.T, ts *testServer, state store.CAState) *adminv1.CA {
	t.Helper()
	resp, err := ts.client.ListCAs(context.Background(), &adminv1.ListCAsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range resp.GetCas() {
		if c.GetState() == string(state) {
			return c
		}
	}
	return nil
}

// TestEmergencyRotation: 'ca rotate --now' activates a new CA at once,
// re-issues every served SVID through the signing rate limit (no renewal
// fails against it), shows its progress (ca show, the gauge), and drops the
// old CA, its CRL and its revocations from the bundle once nothing served
// depends on it. Real Workload API and SDS clients see the new SVID and a
// bundle without the old CA; a stolen old-CA SVID is refused by a peer.
func TestEmergencyRotation(t *testing.T) {
	const rate = 40
	ts := startWorkloadServer(t, Config{SVIDTTL: time.Hour, SignRate: rate})
	ctx := context.Background()
	entryForMe(t, ts.srv, "spiffe://cluster.local/ns/emerg/sa/me")
	holder := subscribeAs(t, ts.srv, "spiffe://cluster.local/ns/emerg/sa/peer", "8000")
	victim := subscribeAs(t, ts.srv, "spiffe://cluster.local/ns/emerg/sa/victim", "8001")
	const fleet = 60
	for i := range fleet {
		subscribeAs(t, ts.srv, fmt.Sprintf("spiffe://cluster.local/ns/emerg/sa/w%d", i), strconv.Itoa(8100+i))
	}
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+ts.wl)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	sdsW := watchSDS(t, ts.wl, "default", "ROOTCA")
	sdsW.next()

	oldCA := ts.srv.BundleCerts()[0]
	stolen := svidOf(t, victim)
	peer := startCRLPeer(t, holder, "spiffe://cluster.local/ns/emerg/sa/victim")
	if err := peer.dial(stolen, subSource{victim}); err != nil {
		t.Fatalf("before the rotation: %v", err)
	}
	// A revocation on the old CA: it must leave with it.
	m, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://cluster.local/ns/emerg/sa/gone"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.client.Revoke(ctx, &adminv1.RevokeRequest{Serial: m.GetSerial()}); err != nil {
		t.Fatal(err)
	}

	rot, err := ts.client.RotateCA(ctx, &adminv1.RotateCARequest{})
	if err != nil {
		t.Fatal(err)
	}
	if rot.GetOld().GetState() != string(store.CATainted) || rot.GetCa().GetState() != string(store.CAActive) {
		t.Fatalf("after rotate: new %s, old %s; want active and tainted", rot.GetCa().GetState(), rot.GetOld().GetState())
	}
	if rot.GetReissuing() < fleet+3 {
		t.Fatalf("re-issuing %d SVIDs, want every served one (>= %d)", rot.GetReissuing(), fleet+3)
	}
	// At 40/s the fleet takes over a second: progress is visible.
	if c := caShow(t, ts.testServer, store.CATainted); c == nil || c.GetServedSvids() == 0 {
		t.Fatalf("ca show right after the rotation: tainted CA %v, want one with served SVIDs left", c)
	}
	if g := gauge(t, ts.srv, "meshid_svids_on_retired_ca"); g == 0 {
		t.Fatal("meshid_svids_on_retired_ca is 0 while the re-issue is under way")
	}

	deadline := time.Now().Add(60 * time.Second)
	// Until both the server's view and what it pushed have dropped it:
	// the view changes a moment before the bundle is re-published.
	for containsCert(ts.srv.BundleCerts(), oldCA) || containsCert(holder.Snapshot().Bundles[0].X509Authorities, oldCA) {
		if time.Now().After(deadline) {
			t.Fatalf("the old CA is still in the bundle 60s after the rotation (%v served SVIDs on it)", gauge(t, ts.srv, "meshid_svids_on_retired_ca"))
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	if g := gauge(t, ts.srv, "meshid_svids_on_retired_ca"); g != 0 {
		t.Fatalf("meshid_svids_on_retired_ca = %v after the old CA left", g)
	}
	if c := caShow(t, ts.testServer, store.CATainted); c != nil {
		t.Fatalf("ca show still lists a tainted CA: %v", c)
	}
	if n := gauge(t, ts.srv, "meshid_renewal_failures_total"); n != 0 {
		t.Fatalf("%v re-issues failed against the signing limits", n)
	}
	rec := ts.srv.caByID(rot.GetOld().GetId()).rec
	if rec.State != store.CARevoked {
		t.Fatalf("old CA state %s, want revoked", rec.State)
	}
	newCA := ts.srv.caByID(rot.GetCa().GetId()).cert

	// The old CA's CRL is gone from what is pushed; the new CA's is there.
	b := holder.Snapshot().Bundles[0]
	for _, rl := range parseCRLs(t, b.CRLs) {
		if rl.CheckSignatureFrom(oldCA) == nil {
			t.Fatal("the old CA's CRL is still pushed after it left the bundle")
		}
	}
	if containsCert(b.X509Authorities, oldCA) {
		t.Fatal("a subscriber's bundle still holds the old CA")
	}
	// The stolen old SVID is refused; the victim's re-issued one works.
	if err := peer.dial(stolen, subSource{victim}); err == nil {
		t.Fatal("an SVID of the dropped CA is still accepted")
	}
	if err := peer.dial(svidOf(t, victim), subSource{victim}); err != nil {
		t.Fatalf("the re-issued SVID: %v", err)
	}

	// Real clients: the Workload API source and the SDS stream end up with
	// an SVID from the new CA and a bundle without the old one.
	deadline = time.Now().Add(30 * time.Second)
	for {
		sv, err := src.GetX509SVID()
		bun, berr := src.GetX509BundleForTrustDomain(ts.srv.TrustDomain())
		if err == nil && berr == nil && sv.Certificates[0].CheckSignatureFrom(newCA) == nil && !containsCert(bun.X509Authorities(), oldCA) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Workload API client never got an SVID from the new CA and a bundle without the old")
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	var leafOK, rootOK bool
	for !leafOK || !rootOK {
		got := sdsW.next()
		if d := got["default"]; d != nil {
			chain := parsePEM(t, d.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			leafOK = len(chain) > 0 && chain[0].CheckSignatureFrom(newCA) == nil
		}
		if r := got["ROOTCA"]; r != nil {
			cas := parsePEM(t, r.GetValidationContext().GetTrustedCa().GetInlineBytes())
			rootOK = !containsCert(cas, oldCA) && containsCert(cas, newCA)
		}
		if time.Now().After(deadline) {
			t.Fatal("the SDS client never got an SVID from the new CA with a bundle without the old")
		}
	}
	ev, err := ts.srv.store.ListAudit(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	var taint, revoke bool
	for _, e := range ev {
		taint = taint || (e.Action == "ca.taint" && e.Target == rot.GetOld().GetId())
		revoke = revoke || (e.Action == "ca.revoke" && e.Target == rot.GetOld().GetId())
	}
	if !taint || !revoke {
		t.Fatalf("audit trail: taint %v, revoke %v; want both", taint, revoke)
	}
}

// TestEmergencyRotationDropOld: with --drop-old the old CA leaves the bundle
// in the same call, and a restart keeps it out.
func TestEmergencyRotationDropOld(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir, SVIDTTL: time.Hour})
	sub := subscribeAs(t, ts.srv, "spiffe://cluster.local/ns/emerg/sa/x", "8200")
	oldCA := ts.srv.BundleCerts()[0]
	if _, err := ts.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	prepared := ts.srv.preparedCA().cert
	rot, err := ts.client.RotateCA(context.Background(), &adminv1.RotateCARequest{DropOld: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*x509.Certificate{oldCA, prepared} {
		if containsCert(ts.srv.BundleCerts(), c) || containsCert(sub.Snapshot().Bundles[0].X509Authorities, c) {
			t.Fatalf("CA %s still in the bundle after rotate --drop-old (the old one, or the discarded prepared one)", c.Subject)
		}
	}
	// The JWT key retired with it leaves the JWKS at once too.
	jb, err := ts.srv.jwtBundle()
	if err != nil {
		t.Fatal(err)
	}
	var jwks struct{ Keys []json.RawMessage }
	if err := json.Unmarshal(jb.JWKS, &jwks); err != nil {
		t.Fatal(err)
	}
	if len(jwks.Keys) != 1 {
		t.Fatalf("%d keys in the JWKS after rotate --drop-old, want only the new one", len(jwks.Keys))
	}
	ts.stop()
	ts = startServer(t, Config{DataDir: dir, SVIDTTL: time.Hour})
	if containsCert(ts.srv.BundleCerts(), oldCA) || ts.srv.activeID != rot.GetCa().GetId() {
		t.Fatal("after a restart the dropped CA is back, or the new CA is not active")
	}
}

func parsePEM(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
}

// TestEmergencyRotationUnderUpstream: the bundle is the upstream root, so
// dropping the old intermediate means listing it on the upstream's CRL: a
// peer checking the chain refuses an SVID of the old intermediate.
func TestEmergencyRotationUnderUpstream(t *testing.T) {
	certFile, keyFile, root := writeUpstream(t, t.TempDir())
	up, err := ca.LoadUpstream(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Upstream: up, SVIDTTL: time.Hour})
	sub := subscribeAs(t, ts.srv, "spiffe://cluster.local/ns/emerg/sa/up", "8300")
	stolen := svidOf(t, sub)
	oldInter := stolen.Certificates[1]
	if _, err := ts.client.RotateCA(context.Background(), &adminv1.RotateCARequest{DropOld: true}); err != nil {
		t.Fatal(err)
	}
	crls := sub.Snapshot().Bundles[0].CRLs
	revoked, err := CheckCRLs(oldInter, root, crls)
	if err != nil {
		t.Fatal(err)
	}
	if !revoked {
		t.Fatal("the dropped intermediate is not on the upstream root's CRL")
	}
	// The new intermediate is not.
	deadline := time.Now().Add(30 * time.Second)
	for svidOf(t, sub).Certificates[1].Equal(oldInter) {
		if time.Now().After(deadline) {
			t.Fatal("the SVID was not re-issued under the new intermediate")
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	if r, _ := CheckCRLs(svidOf(t, sub).Certificates[1], root, sub.Snapshot().Bundles[0].CRLs); r {
		t.Fatal("the new intermediate is listed as revoked")
	}
}
