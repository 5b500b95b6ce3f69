package ca

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// EncodeCertsPEM concatenates the DER certificates as PEM "CERTIFICATE"
// blocks, in the order given.
func EncodeCertsPEM(ders ...[]byte) []byte {
	// Each block is ~4/3 of the DER plus headers and line breaks; sizing the
	// buffer once avoids regrowth on the issuance path.
	n := 0
	for _, d := range ders {
		n += len(d)*4/3 + len(d)/48 + 64
	}
	var buf bytes.Buffer
	buf.Grow(n)
	for _, d := range ders {
		// Writes to a bytes.Buffer cannot fail.
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: d})
	}
	return buf.Bytes()
}

// EncodeKeyPEM encodes key as PKCS#8 in a "PRIVATE KEY" block, the one form
// Envoy, go-spiffe and openssl all read for every key type we generate.
func EncodeKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ChainPEM returns the leaf followed by its intermediates, the order TLS
// stacks expect in a certificate file.
func (s *X509SVID) ChainPEM() []byte {
	ders := make([][]byte, 0, 1+len(s.ChainDER))
	ders = append(ders, s.CertDER)
	ders = append(ders, s.ChainDER...)
	return EncodeCertsPEM(ders...)
}
