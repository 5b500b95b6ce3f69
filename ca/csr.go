package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// ParseCSR parses a PKCS#10 request given as DER or as PEM ("CERTIFICATE
// REQUEST"), and checks its self-signature so we know the requester holds the
// private key. Only the public key is used for issuance: the identity and SANs
// come from registration entries, never from what the CSR asks for. Every
// failure wraps ErrBadCSR.
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	if trimmed := bytes.TrimLeft(der, " \t\r\n"); bytes.HasPrefix(trimmed, []byte("-----BEGIN")) {
		block, _ := pem.Decode(trimmed)
		if block == nil {
			return nil, fmt.Errorf("%w: malformed PEM", ErrBadCSR)
		}
		// "NEW CERTIFICATE REQUEST" is what older openssl/Windows tools write.
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, fmt.Errorf("%w: PEM block is %q, want \"CERTIFICATE REQUEST\"", ErrBadCSR, block.Type)
		}
		der = block.Bytes
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: malformed: %w", ErrBadCSR, err)
	}
	if err := checkSubjectKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: bad signature: %w", ErrBadCSR, err)
	}
	return csr, nil
}
