package controlplane

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

func writeUpstream(t *testing.T, dir string) (certFile, keyFile string, root *x509.Certificate) {
	t.Helper()
	up, err := ca.NewRoot(spiffeid.RequireTrustDomainFromString("cluster.local"), ca.KeyP256, 10*365*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.EncodeKeyPEM(up.Key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "root.pem"), filepath.Join(dir, "root.key")
	if err := os.WriteFile(certFile, ca.EncodeCertsPEM(up.Cert.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, up.Cert
}

func TestUpstreamCA(t *testing.T) {
	certFile, keyFile, root := writeUpstream(t, t.TempDir())
	up, err := ca.LoadUpstream(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Upstream: up, DisableAutoRotate: true})
	ctx := context.Background()
	bundle := ts.srv.BundleCerts()
	if len(bundle) != 1 || !bundle[0].Equal(root) {
		t.Fatalf("bundle %d certs, want exactly the upstream root", len(bundle))
	}
	verify := func() *x509.Certificate {
		t.Helper()
		svid, err := ts.srv.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/ns/a/sa/b", Requester: "test"})
		if err != nil {
			t.Fatal(err)
		}
		if len(svid.ChainDER) != 1 {
			t.Fatalf("chain carries %d intermediates, want 1", len(svid.ChainDER))
		}
		var chain []*x509.Certificate
		for _, der := range append([][]byte{svid.CertDER}, svid.ChainDER...) {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			chain = append(chain, c)
		}
		if _, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(ts.srv.td, ts.srv.BundleCerts())); err != nil {
			t.Fatalf("SVID does not verify against the upstream root: %v", err)
		}
		return chain[1]
	}
	inter1 := verify()
	// Rotation of the intermediate: the bundle stays the one root.
	if _, err := ts.srv.PrepareCA(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.srv.ActivateCA(ctx, "test", true); err != nil {
		t.Fatal(err)
	}
	if b := ts.srv.BundleCerts(); len(b) != 1 || !b[0].Equal(root) {
		t.Fatalf("after rotation the bundle has %d certs", len(b))
	}
	if inter2 := verify(); inter2.Equal(inter1) {
		t.Fatal("rotation did not change the intermediate")
	}

	// A key that does not match the certificate is refused.
	_, otherKey, _ := writeUpstream(t, t.TempDir())
	if _, err := ca.LoadUpstream(certFile, otherKey); err == nil {
		t.Fatal("mismatched upstream key accepted")
	}
}

// TestUpstreamChainCRLsLeafOnly: with an upstream CA that has a CA above
// it, meshid cannot sign CRLs for every CA of a chain, so it tells peers
// to check the leaf only (Envoy would otherwise refuse every chain).
func TestUpstreamChainCRLsLeafOnly(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	now := time.Now()
	root, err := ca.NewRoot(td, ca.KeyP256, 10*365*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.GenerateKey(ca.KeyP256)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: "corp issuing CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(5 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.Cert, key.Public(), root.Key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyPEM, _ := ca.EncodeKeyPEM(key)
	certFile, keyFile := filepath.Join(dir, "chain.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, ca.EncodeCertsPEM(der, root.Cert.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	up, err := ca.LoadUpstream(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Upstream: up, DisableAutoRotate: true})
	if b := ts.srv.BundleCerts(); len(b) != 1 || !b[0].Equal(root.Cert) {
		t.Fatal("bundle is not the upstream root")
	}
	if _, err := ts.srv.CreateEntry(context.Background(), EntrySpec{SpiffeID: "spiffe://cluster.local/w",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:9"}}}, "test"); err != nil {
		t.Fatal(err)
	}
	sub, err := ts.srv.Subscribe(context.Background(), identity.Caller{Selectors: []string{"unix:uid:9"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	snap := sub.Snapshot()
	if !snap.Bundles[0].CRLLeafOnly {
		t.Fatal("CRLs must be marked leaf-only when the upstream has a CA above it")
	}
	if _, _, err := x509svid.Verify(snap.SVIDs[0].Certs, x509bundle.FromX509Authorities(td, snap.Bundles[0].X509Authorities)); err != nil {
		t.Fatalf("SVID through a two-level upstream chain: %v", err)
	}
}
