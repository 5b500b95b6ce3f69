package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/store"
)

// TestSignPodCertificate: a pod certificate is an X509-SVID for
// ns/<namespace>/sa/<sa> with the lifetime Kubernetes allows (the 1 h
// floor, the maxExpirationSeconds cap, --svid-ttl otherwise), it is in the
// inventory with the pod and node, and revoking it puts its serial on the
// CRL like any other SVID.
func TestSignPodCertificate(t *testing.T) {
	ts := startServer(t, Config{SVIDTTL: 24 * time.Hour, CATTL: 30 * 24 * time.Hour})
	s := ts.srv
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		max, want time.Duration
	}{
		{0, 24 * time.Hour},
		{time.Hour, time.Hour},
		{2 * time.Hour, 2 * time.Hour},
		{48 * time.Hour, 24 * time.Hour},
	} {
		pc, err := s.SignPodCertificate(ctx, PodCertRequest{Namespace: "demo", ServiceAccount: "web", PodName: "web-0", PodUID: "pod-uid-1",
			NodeName: "node-a", NodeUID: "node-uid-1", PublicKey: key.Public(), MaxLifetime: tc.max})
		if err != nil {
			t.Fatalf("max %s: %v", tc.max, err)
		}
		if got := pc.NotAfter.Sub(pc.NotBefore); got != tc.want {
			t.Fatalf("max %s: lifetime %s, want %s", tc.max, got, tc.want)
		}
		leaf, err := x509.ParseCertificate(pc.ChainDER[0])
		if err != nil {
			t.Fatal(err)
		}
		if !leaf.NotBefore.Equal(pc.NotBefore) || !leaf.NotAfter.Equal(pc.NotAfter) {
			t.Fatalf("times %s..%s, leaf %s..%s", pc.NotBefore, pc.NotAfter, leaf.NotBefore, leaf.NotAfter)
		}
		id, _, err := x509svid.ParseAndVerify(pc.ChainDER, x509bundle.FromX509Authorities(s.TrustDomain(), s.BundleCerts()))
		if err != nil {
			t.Fatalf("not a valid X509-SVID: %v", err)
		}
		if id.String() != "spiffe://cluster.local/ns/demo/sa/web" || pc.SpiffeID != id.String() {
			t.Fatalf("id %s / %s", id, pc.SpiffeID)
		}
	}
	for _, max := range []time.Duration{30 * time.Minute, 92 * 24 * time.Hour} {
		if _, err := s.SignPodCertificate(ctx, PodCertRequest{Namespace: "demo", ServiceAccount: "web", PublicKey: key.Public(), MaxLifetime: max}); !isInvalidArg(err) {
			t.Fatalf("max %s: %v, want InvalidArgument", max, err)
		}
	}

	pc, err := s.SignPodCertificate(ctx, PodCertRequest{Namespace: "demo", ServiceAccount: "db", PodName: "db-0", PodUID: "pod-uid-2",
		NodeName: "node-b", NodeUID: "node-uid-2", PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	rows, _, err := s.Store().ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	var row *store.IssuedSVID
	for i := range rows {
		if rows[i].Serial == pc.Serial {
			row = &rows[i]
		}
	}
	if row == nil {
		t.Fatalf("serial %s not in the inventory (%d rows)", pc.Serial, len(rows))
	}
	for _, w := range []string{"demo/db-0", "pod-uid-2", "node-b", "node-uid-2"} {
		if !strings.Contains(row.Requester, w) {
			t.Fatalf("requester %q lacks %q", row.Requester, w)
		}
	}
	if row.SpiffeID != "spiffe://cluster.local/ns/demo/sa/db" {
		t.Fatalf("row %+v", row)
	}
	if _, err := s.Revoke(ctx, "", pc.Serial, "test"); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	s.pubMu.Lock()
	crls, err := s.crls()
	s.pubMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	want, _ := new(big.Int).SetString(pc.Serial, 16)
	found := false
	for _, der := range crls {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range rl.RevokedCertificateEntries {
			found = found || e.SerialNumber.Cmp(want) == 0
		}
	}
	if !found {
		t.Fatalf("serial %s not on the CRLs", pc.Serial)
	}
}

func isInvalidArg(err error) bool {
	var ia *InvalidArgumentError
	return errors.As(err, &ia)
}
