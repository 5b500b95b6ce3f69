package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"strings"
)

// Minimum and maximum RSA modulus sizes we accept for SVID subject keys. The
// floor follows NIST SP 800-131A; the ceiling keeps a hostile CSR from making
// every verifier do an arbitrarily expensive operation.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// GenerateKey makes a new private key of the given type.
func GenerateKey(kt KeyType) (crypto.Signer, error) {
	switch kt {
	case KeyP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case KeyRSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case KeyEd25519:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generate ed25519 key: %w", err)
		}
		return priv, nil
	default:
		return nil, fmt.Errorf("generate key %q: %w", string(kt), ErrUnsupportedKey)
	}
}

// ParseKeyType turns a command-line spelling into a KeyType. It is
// case-insensitive so "EC-P256" from an operator works; the empty string is
// rejected rather than defaulted so that callers choose their own default.
func ParseKeyType(s string) (KeyType, error) {
	kt := KeyType(strings.ToLower(strings.TrimSpace(s)))
	switch kt {
	case KeyP256, KeyP384, KeyRSA2048, KeyRSA3072, KeyEd25519:
		return kt, nil
	}
	return "", fmt.Errorf("key type %q (want one of ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519): %w", s, ErrUnsupportedKey)
}

// checkSubjectKey rejects public keys that peers (Envoy/BoringSSL in
// particular) would not accept or that are too weak, so the failure happens at
// issuance instead of at the first handshake.
func checkSubjectKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s: %w", curveName(k.Curve), ErrUnsupportedKey)
		}
	case *rsa.PublicKey:
		bits := k.N.BitLen()
		if bits < minRSABits || bits > maxRSABits {
			return fmt.Errorf("RSA key of %d bits (want %d..%d): %w", bits, minRSABits, maxRSABits, ErrUnsupportedKey)
		}
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("ed25519 key of %d bytes: %w", len(k), ErrUnsupportedKey)
		}
	default:
		return fmt.Errorf("public key type %T: %w", pub, ErrUnsupportedKey)
	}
	return nil
}

func curveName(c elliptic.Curve) string {
	if c == nil || c.Params() == nil {
		return "<nil>"
	}
	return c.Params().Name
}

// subjectKeyID computes the key identifier with RFC 5280 section 4.2.1.2
// method 1: SHA-1 over the subjectPublicKey BIT STRING contents. Go only fills
// SKID in for CA certificates, and leaves need it for path building by
// verifiers that match AKID/SKID. The per-type fast paths avoid a full SPKI
// marshal+unmarshal on the hot path; they produce the same bytes x509 encodes.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	var bits []byte
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		b, err := k.Bytes()
		if err != nil {
			return nil, fmt.Errorf("encode ECDSA public key: %w", err)
		}
		bits = b
	case ed25519.PublicKey:
		bits = k
	case *rsa.PublicKey:
		bits = x509.MarshalPKCS1PublicKey(k)
	default:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, fmt.Errorf("marshal public key: %w", err)
		}
		var spki struct {
			Algorithm pkix.AlgorithmIdentifier
			PublicKey asn1.BitString
		}
		if _, err := asn1.Unmarshal(der, &spki); err != nil {
			return nil, fmt.Errorf("parse marshaled public key: %w", err)
		}
		bits = spki.PublicKey.Bytes
	}
	sum := sha1.Sum(bits)
	return sum[:], nil
}
