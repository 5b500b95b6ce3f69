package ca

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Upstream is an existing CA that meshid's signing CAs chain to (a
// "plug-in" CA): meshid's CA becomes an intermediate under it and the trust
// bundle is the upstream root.
type Upstream struct {
	// Cert signs meshid's intermediates; Chain is what lies above it, ending
	// with the root (empty when Cert is the root itself).
	Cert  *x509.Certificate
	Chain []*x509.Certificate
	Key   crypto.Signer
}

// Root is the certificate peers trust.
func (u *Upstream) Root() *x509.Certificate {
	if n := len(u.Chain); n > 0 {
		return u.Chain[n-1]
	}
	return u.Cert
}

// LoadUpstream reads the upstream CA from PEM files: certFile holds the
// signing certificate, optionally followed by its chain up to the root;
// keyFile its private key (PKCS#8, SEC 1 or PKCS#1).
func LoadUpstream(certFile, keyFile string) (*Upstream, error) {
	cb, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("upstream CA certificate: %w", err)
	}
	var certs []*x509.Certificate
	for rest := cb; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("upstream CA certificate %s: %w", certFile, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("upstream CA certificate %s: no PEM certificate", certFile)
	}
	kb, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("upstream CA key: %w", err)
	}
	blk, _ := pem.Decode(kb)
	if blk == nil {
		return nil, fmt.Errorf("upstream CA key %s: no PEM block", keyFile)
	}
	var key any
	switch blk.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(blk.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("upstream CA key %s: %w", keyFile, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("upstream CA key %s: %T cannot sign", keyFile, key)
	}
	u := &Upstream{Cert: certs[0], Chain: certs[1:], Key: signer}
	return u, u.check()
}

func (u *Upstream) check() error {
	if !u.Cert.IsCA || (u.Cert.KeyUsage != 0 && u.Cert.KeyUsage&x509.KeyUsageCertSign == 0) {
		return fmt.Errorf("upstream certificate %q is not a CA that may sign certificates", u.Cert.Subject)
	}
	pub, ok := u.Key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(u.Cert.PublicKey) {
		return fmt.Errorf("upstream CA key does not match certificate %q", u.Cert.Subject)
	}
	child := u.Cert
	for i, c := range u.Chain {
		if err := child.CheckSignatureFrom(c); err != nil {
			return fmt.Errorf("upstream chain certificate %d (%q) did not sign %q: %w", i, c.Subject, child.Subject, err)
		}
		child = c
	}
	if r := u.Root(); r.CheckSignatureFrom(r) != nil {
		return errors.New("upstream chain does not end with a self-signed root; include the chain up to the root after the signing certificate")
	}
	return nil
}

// NewIntermediate makes a signing CA for td under the upstream CA, never
// outliving it.
func NewIntermediate(td spiffeid.TrustDomain, kt KeyType, ttl time.Duration, now time.Time, up *Upstream) (*Authority, error) {
	if kt == "" {
		kt = KeyP256
	}
	switch kt {
	case KeyP256, KeyP384, KeyRSA3072:
	default:
		return nil, fmt.Errorf("new intermediate CA: key type %q not allowed for a CA: %w", string(kt), ErrUnsupportedKey)
	}
	key, err := GenerateKey(kt)
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	skid, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl).Truncate(time.Second)
	if notAfter.After(up.Cert.NotAfter) {
		notAfter = up.Cert.NotAfter
	}
	serialHex := serial.Text(16)
	if len(serialHex) > 8 {
		serialHex = serialHex[:8]
	}
	tmpl := &x509.Certificate{
		SerialNumber:                serial,
		Subject:                     pkix.Name{Organization: []string{organization}, CommonName: "meshid intermediate CA " + td.Name() + " " + serialHex},
		NotBefore:                   now.Add(-caClockSkew).Truncate(time.Second),
		NotAfter:                    notAfter,
		BasicConstraintsValid:       true,
		IsCA:                        true,
		MaxPathLenZero:              true,
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		SubjectKeyId:                skid,
		URIs:                        []*url.URL{td.ID().URL()},
		PermittedURIDomains:         []string{td.Name()},
		PermittedDNSDomainsCritical: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, up.Cert, key.Public(), up.Key)
	if err != nil {
		return nil, fmt.Errorf("new intermediate CA: upstream signing: %w", err)
	}
	chain := make([][]byte, 0, 1+len(up.Chain))
	chain = append(chain, up.Cert.Raw)
	for _, c := range up.Chain {
		chain = append(chain, c.Raw)
	}
	return LoadAuthority(der, chain, key, td)
}
