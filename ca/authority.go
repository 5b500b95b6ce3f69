package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// caClockSkew backdates a new CA so that hosts whose clocks run a little
// behind still accept SVIDs it signs right away.
const caClockSkew = time.Minute

// organization is the Subject O of everything meshid issues, so operators can
// tell meshid certificates apart in openssl/Envoy admin output.
const organization = "meshid"

// signCache holds what SignX509SVID would otherwise recompute on every call.
// It is keyed by the certificate pointer and chain identity so that a caller
// who swaps Authority.Cert or Authority.Chain gets a fresh cache rather than
// stale chain bytes.
type signCache struct {
	cert       *x509.Certificate
	chainFirst *x509.Certificate
	chainLen   int
	ecKey      *ecdsa.PrivateKey // Authority.Key when it is one, else nil

	chainDER    [][]byte // what goes after the leaf: never the trust anchor
	leafSubject []byte   // DER of Subject O=meshid, shared by every SVID

	// fastOpts is the EnableFastSign setting this cache was built for; nil
	// when fast signing is off (the default).
	fastOpts *FastSignOptions
	// fast is the hand-built-DER signing state for an in-process ECDSA CA
	// key (see fastsign.go); nil when SVIDs go through CreateCertificate.
	// It remembers the key it was built for, so it is ignored if
	// Authority.Key alone is replaced.
	fast *ecFastPath
	// fastErr says why fast is nil although fastOpts asked for it.
	fastErr error
}

// authorityState is the unexported part of Authority. It lives behind an
// atomic.Value (which has no noCopy marker) so that code elsewhere that copies
// an Authority by value still passes go vet.
type authorityState struct {
	cache    atomic.Value // *signCache
	fastOpts atomic.Value // *FastSignOptions; absent or nil: fast signing off
}

// NewRoot creates a self-signed root CA for td. kt may be empty (P-256);
// otherwise it must be one of KeyP256, KeyP384 or KeyRSA3072: Ed25519 is not
// accepted by Envoy as a CA signature and RSA-2048 is too short-lived a key for
// a CA.
func NewRoot(td spiffeid.TrustDomain, kt KeyType, ttl time.Duration, now time.Time) (*Authority, error) {
	if td.IsZero() {
		return nil, errors.New("new root CA: trust domain is empty")
	}
	if kt == "" {
		kt = KeyP256
	}
	switch kt {
	case KeyP256, KeyP384, KeyRSA3072:
	default:
		return nil, fmt.Errorf("new root CA: key type %q not allowed for a CA (want ec-p256, ec-p384 or rsa-3072): %w", string(kt), ErrUnsupportedKey)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("new root CA: TTL must be positive, got %s", ttl)
	}
	key, err := GenerateKey(kt)
	if err != nil {
		return nil, fmt.Errorf("new root CA: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("new root CA: %w", err)
	}
	skid, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, fmt.Errorf("new root CA: %w", err)
	}
	// A short serial suffix in the CN keeps two generations of the CA
	// distinguishable in tools that only show the subject (rotation overlap).
	serialHex := serial.Text(16)
	if len(serialHex) > 8 {
		serialHex = serialHex[:8]
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{organization},
			CommonName:   "meshid CA " + td.Name() + " " + serialHex,
		},
		NotBefore:             now.Add(-caClockSkew).Truncate(time.Second),
		NotAfter:              now.Add(ttl).Truncate(time.Second),
		BasicConstraintsValid: true,
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SubjectKeyId:          skid,
		// X509-SVID section 3.2 recommends signing certificates carry the
		// trust domain's SPIFFE ID.
		URIs: []*url.URL{td.ID().URL()},
		// Critical URI name constraint (X509-SVID section 4.2): even if this
		// key leaks, it cannot mint identities another trust domain accepts.
		PermittedURIDomains:         []string{td.Name()},
		PermittedDNSDomainsCritical: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("new root CA: sign certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("new root CA: parse own certificate: %w", err)
	}
	a := &Authority{Cert: cert, Key: key, TrustDomain: td}
	if _, err := a.prepare(); err != nil {
		return nil, fmt.Errorf("new root CA: %w", err)
	}
	return a, nil
}

// LoadAuthority rebuilds an Authority from persisted material. chainDER lists
// the certificates above certDER (empty for a self-signed root); it may end
// with the trust anchor, which is then what Root returns.
func LoadAuthority(certDER []byte, chainDER [][]byte, key crypto.Signer, td spiffeid.TrustDomain) (*Authority, error) {
	if td.IsZero() {
		return nil, errors.New("load CA: trust domain is empty")
	}
	if key == nil {
		return nil, errors.New("load CA: private key is nil")
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("load CA: parse certificate: %w", err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("load CA: certificate %q is not a CA", cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA: certificate %q lacks keyCertSign", cert.Subject)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("load CA: private key does not match certificate %q", cert.Subject)
	}
	// A URI constraint that excludes td would make every SVID fail path
	// validation at the peer; better to refuse the CA now.
	if len(cert.PermittedURIDomains) > 0 && !containsFold(cert.PermittedURIDomains, td.Name()) {
		return nil, fmt.Errorf("load CA: certificate %q name constraints %v do not permit trust domain %q", cert.Subject, cert.PermittedURIDomains, td.Name())
	}
	chain := make([]*x509.Certificate, 0, len(chainDER))
	child := cert
	for i, d := range chainDER {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("load CA: parse chain certificate %d: %w", i, err)
		}
		if err := child.CheckSignatureFrom(c); err != nil {
			return nil, fmt.Errorf("load CA: chain certificate %d (%q) did not sign %q: %w", i, c.Subject, child.Subject, err)
		}
		chain = append(chain, c)
		child = c
	}
	a := &Authority{Cert: cert, Key: key, Chain: chain, TrustDomain: td}
	if _, err := a.prepare(); err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	return a, nil
}

// Root returns the certificate to publish in the trust bundle: the top of
// Chain when there is one, else Cert itself.
func (a *Authority) Root() *x509.Certificate {
	if n := len(a.Chain); n > 0 {
		return a.Chain[n-1]
	}
	return a.Cert
}

// RemainingLife is how much longer the CA certificate is valid at now; it is
// negative once the CA has expired. Issuance policy uses it to cap SVID TTLs
// and to decide when to rotate.
func (a *Authority) RemainingLife(now time.Time) time.Duration {
	return a.Cert.NotAfter.Sub(now)
}

// Fingerprint is the lowercase hex SHA-256 of the certificate's DER. meshid
// uses it as a CA's ID because it is stable across restarts and unique per key
// and certificate.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:])
}

// prepare returns the per-Authority signing cache, building it when absent or
// when Cert/Chain have been replaced since it was built. Concurrent first
// calls may each build one; they are identical, so the last store wins
// harmlessly.
func (a *Authority) prepare() (*signCache, error) {
	var first *x509.Certificate
	if len(a.Chain) > 0 {
		first = a.Chain[0]
	}
	// Key is compared only as an *ecdsa.PrivateKey: comparing the interface
	// would panic for slice-typed keys such as ed25519.PrivateKey. Other key
	// types are not cached against, as only the ECDSA fast path keeps state
	// derived from the key.
	ecKey, _ := a.Key.(*ecdsa.PrivateKey)
	opts, _ := a.state.fastOpts.Load().(*FastSignOptions)
	if c, _ := a.state.cache.Load().(*signCache); c != nil &&
		c.cert == a.Cert && c.chainFirst == first && c.chainLen == len(a.Chain) && c.ecKey == ecKey && c.fastOpts == opts {
		return c, nil
	}
	if a.Cert == nil || a.Key == nil {
		return nil, errors.New("authority has no certificate or key")
	}
	if a.TrustDomain.IsZero() {
		return nil, errors.New("authority has no trust domain")
	}
	subj, err := asn1.Marshal(pkix.Name{Organization: []string{organization}}.ToRDNSequence())
	if err != nil {
		return nil, fmt.Errorf("marshal SVID subject: %w", err)
	}
	// Peers need every certificate between the leaf and their trust anchor.
	// The anchor itself is in their bundle, so sending it only wastes bytes
	// in every handshake.
	var chainDER [][]byte
	if !isSelfSigned(a.Cert) {
		chainDER = append(chainDER, a.Cert.Raw)
	}
	for _, c := range a.Chain {
		if !isSelfSigned(c) {
			chainDER = append(chainDER, c.Raw)
		}
	}
	c := &signCache{
		cert:        a.Cert,
		chainFirst:  first,
		chainLen:    len(a.Chain),
		ecKey:       ecKey,
		chainDER:    chainDER,
		leafSubject: subj,
		fastOpts:    opts,
	}
	if opts != nil {
		c.fast, c.fastErr = a.buildFastPath(subj, opts)
	}
	a.state.cache.Store(c)
	return c, nil
}

// isSelfSigned reports whether c is a trust anchor candidate. Comparing raw
// names first keeps the signature check off the common path.
func isSelfSigned(c *x509.Certificate) bool {
	if !bytes.Equal(c.RawIssuer, c.RawSubject) {
		return false
	}
	return c.CheckSignatureFrom(c) == nil
}

// newSerial returns a random positive 128-bit serial number. 16 bytes from
// crypto/rand exceed the CA/B Forum's 64-bit entropy floor; clearing the top
// bit keeps the DER INTEGER at 16 octets instead of 17.
func newSerial() (*big.Int, error) {
	var b [16]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("read random serial: %w", err)
		}
		b[0] &= 0x7f
		s := new(big.Int).SetBytes(b[:])
		if s.Sign() > 0 {
			return s, nil
		}
	}
}

func containsFold(list []string, s string) bool {
	for _, v := range list {
		if strings.EqualFold(v, s) {
			return true
		}
	}
	return false
}
