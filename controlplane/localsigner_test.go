package controlplane

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"testing"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/svidcache"
)

// TestLocalSignerCertifiesTheCacheKey: the server's signer certifies the
// key it is given, both handed over directly (the path the cache takes, as
// localSigner is a svidcache.KeySigner) and inside a CSR (the Signer
// contract a remote signer keeps), and SVIDs served through the cache are
// for the key the cache holds.
func TestLocalSignerCertifiesTheCacheKey(t *testing.T) {
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), DisableAutoRotate: true})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	sel := store.Selector{Type: "unix", Value: "uid:1000"}
	ent, err := srv.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/w/key", Selectors: []store.Selector{sel}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	var signer svidcache.Signer = localSigner{srv}
	ks, ok := signer.(svidcache.KeySigner)
	if !ok {
		t.Fatal("localSigner is not a svidcache.KeySigner: the cache would make and send a CSR per SVID")
	}
	leafKey := func(chain [][]byte) crypto.PublicKey {
		t.Helper()
		if len(chain) == 0 {
			t.Fatal("empty chain")
		}
		leaf, err := x509.ParseCertificate(chain[0])
		if err != nil {
			t.Fatal(err)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != ent.SpiffeID {
			t.Fatalf("leaf URIs %v, want %s", leaf.URIs, ent.SpiffeID)
		}
		return leaf.PublicKey
	}
	e := cacheEntry(ent)

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := ks.SignX509SVIDKey(ctx, e, key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if got := leafKey(chain).(*ecdsa.PublicKey); !got.Equal(key.Public()) {
		t.Error("SignX509SVIDKey certified another key than the one given")
	}

	csrKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, csrKey)
	if err != nil {
		t.Fatal(err)
	}
	chain, err = signer.SignX509SVID(ctx, e, csr)
	if err != nil {
		t.Fatal(err)
	}
	if got := leafKey(chain).(*ecdsa.PublicKey); !got.Equal(csrKey.Public()) {
		t.Error("SignX509SVID certified another key than the CSR's")
	}

	sub, err := srv.Subscribe(ctx, identity.Caller{Selectors: []string{SelectorString(sel)}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	svids := sub.Snapshot().SVIDs
	if len(svids) != 1 {
		t.Fatalf("served %d SVIDs, want 1", len(svids))
	}
	if pub, ok := svids[0].Certs[0].PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(svids[0].Key.Public()) {
		t.Error("served certificate is not for the key the cache holds")
	}
}
