package ca

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"time"
)

// RevokedCert is one entry of a CRL.
type RevokedCert struct {
	Serial    *big.Int
	RevokedAt time.Time
}

// SignCRL makes a CRL for issuer listing revoked, numbered number (CRL
// numbers must increase with each new CRL of an issuer). nextUpdate is
// when relying parties should treat it as stale: peers such as Envoy
// (BoringSSL) reject every certificate of an issuer whose CRL is past
// nextUpdate, so callers set it generously and push fresh CRLs on change.
func SignCRL(issuer *x509.Certificate, key crypto.Signer, revoked []RevokedCert, number int64, now, nextUpdate time.Time) ([]byte, error) {
	entries := make([]x509.RevocationListEntry, len(revoked))
	for i, r := range revoked {
		entries[i] = x509.RevocationListEntry{SerialNumber: r.Serial, RevocationTime: r.RevokedAt.UTC()}
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(number),
		ThisUpdate:                now.Add(-caClockSkew).UTC(),
		NextUpdate:                nextUpdate.UTC(),
		RevokedCertificateEntries: entries,
	}, issuer, key)
	if err != nil {
		return nil, fmt.Errorf("sign CRL for %q: %w", issuer.Subject, err)
	}
	return der, nil
}
