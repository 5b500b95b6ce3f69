package svidcache

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
)

// X509Bundle builds the trust bundle of td from its authorities and CRLs
// (DER), versioned by content so SetBundles pushes only real changes.
// leafOnly marks CRLs that cover only the issuers of leaves.
func X509Bundle(td spiffeid.TrustDomain, certs []*x509.Certificate, crls [][]byte, leafOnly bool) *identity.Bundle {
	ders := make([][]byte, len(certs))
	for i, c := range certs {
		ders[i] = c.Raw
	}
	pemBytes := ca.EncodeCertsPEM(ders...)
	var crlPEM []byte
	for _, c := range crls {
		crlPEM = append(crlPEM, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: c})...)
	}
	h := sha256.New()
	h.Write(pemBytes)
	h.Write(crlPEM)
	if leafOnly {
		h.Write([]byte("leaf-only"))
	}
	return &identity.Bundle{TrustDomain: td, X509Authorities: certs, PEM: pemBytes, CRLs: crls, CRLPEM: crlPEM, CRLLeafOnly: leafOnly, Version: hex.EncodeToString(h.Sum(nil)[:8])}
}
