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
// nextUpdate, so callers re-sign and push well before it.
//
// thisUpdate is back-dated for peers whose clocks run a little behind, but
// never to before the newest revocation listed: a CRL claiming to predate
// a revocation it carries is inconsistent (RFC 5280 5.1.2.4, 5.3.2), and
// validators that compare the two reject it.
func SignCRL(issuer *x509.Certificate, key crypto.Signer, revoked []RevokedCert, number int64, now, nextUpdate time.Time) ([]byte, error) {
	entries := make([]x509.RevocationListEntry, len(revoked))
	thisUpdate := now.Add(-caClockSkew)
	for i, r := range revoked {
		entries[i] = x509.RevocationListEntry{SerialNumber: r.Serial, RevocationTime: r.RevokedAt.UTC()}
		if r.RevokedAt.After(thisUpdate) {
			thisUpdate = r.RevokedAt
		}
	}
	// The encoding keeps whole seconds: round up, so the encoded thisUpdate
	// is not before the exact revocation time either.
	if t := thisUpdate.Truncate(time.Second); t.Before(thisUpdate) {
		thisUpdate = t.Add(time.Second)
	}
	// nextUpdate must follow thisUpdate (RFC 5280 5.1.2.5); an issuer
	// about to expire gets the shortest CRL that says so.
	if !nextUpdate.After(thisUpdate) {
		nextUpdate = thisUpdate.Add(time.Second)
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(number),
		ThisUpdate:                thisUpdate.UTC(),
		NextUpdate:                nextUpdate.UTC(),
		RevokedCertificateEntries: entries,
	}, issuer, key)
	if err != nil {
		return nil, fmt.Errorf("sign CRL for %q: %w", issuer.Subject, err)
	}
	return der, nil
}
