// Package ca holds meshid's certificate authority: key generation, the CA
// certificate, and minting SPIFFE X.509-SVIDs that follow the X509-SVID
// standard (one URI SAN, leaf, digitalSignature, serverAuth+clientAuth).
//
// SVIDs are signed with x509.CreateCertificate. Authority.EnableFastSign opts
// in to a faster path for in-process ECDSA CA keys that skips its post-sign
// self-check, guarded by a canary at load and a sampled check (fastsign.go).
package ca

import (
	"crypto"
	"crypto/x509"
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// KeyType names a key algorithm accepted on the command line.
type KeyType string

// Supported key types. CAs take P256, P384 and RSA3072; SVIDs any of them.
const (
	KeyP256    KeyType = "ec-p256"
	KeyP384    KeyType = "ec-p384"
	KeyRSA2048 KeyType = "rsa-2048"
	KeyRSA3072 KeyType = "rsa-3072"
	KeyEd25519 KeyType = "ed25519"
)

// Errors the controlplane maps to InvalidArgument.
var (
	ErrTTLExceedsCA   = errors.New("requested TTL outlives the signing CA")
	ErrBadCSR         = errors.New("invalid CSR")
	ErrForeignID      = errors.New("SPIFFE ID is not in the CA's trust domain")
	ErrUnsupportedKey = errors.New("unsupported key type")
)

// Authority is one signing CA: its certificate, its key, and the chain above
// it when it is an intermediate.
type Authority struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// Chain lists the certificates above Cert, nearest first; empty for a
	// self-signed root. It may end with the trust anchor, which Root then
	// returns; SVID chains never include a self-signed certificate.
	Chain       []*x509.Certificate
	TrustDomain spiffeid.TrustDomain

	state authorityState // signing cache; see prepare
}

// SVIDRequest is what to put into an X.509-SVID.
type SVIDRequest struct {
	ID        spiffeid.ID
	PublicKey crypto.PublicKey
	DNSNames  []string
	TTL       time.Duration
	Now       time.Time
}

// X509SVID is a minted certificate. Key is nil when the caller sent a CSR.
type X509SVID struct {
	ID        spiffeid.ID
	CertDER   []byte
	ChainDER  [][]byte // intermediates (without the leaf, without the root)
	Key       crypto.Signer
	Serial    string // lowercase hex
	NotBefore time.Time
	NotAfter  time.Time
}
