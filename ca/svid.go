package ca

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrInvalidSVIDRequest marks SVID requests that are malformed in themselves
// (bad DNS name, non-positive TTL, trust-domain-only ID). Like the errors in
// api.go it maps to InvalidArgument.
var ErrInvalidSVIDRequest = errors.New("invalid SVID request")

// svidClockSkew backdates SVIDs so a peer whose clock is slightly behind ours
// does not reject a certificate that was issued a moment ago. It is kept small
// because it also lengthens the effective lifetime of every SVID.
const svidClockSkew = 10 * time.Second

// svidExtKeyUsage is shared by every template; CreateCertificate only reads it.
var svidExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}

// SignX509SVID issues an X509-SVID for req.PublicKey, following the SPIFFE
// X509-SVID standard: one URI SAN, not a CA, digitalSignature (plus
// keyEncipherment for RSA keys, which RSA key exchange needs) and
// serverAuth+clientAuth. A zero req.Now means time.Now().
func (a *Authority) SignX509SVID(req SVIDRequest) (*X509SVID, error) {
	c, err := a.prepare()
	if err != nil {
		return nil, fmt.Errorf("sign X509-SVID: %w", err)
	}
	if req.ID.IsZero() {
		return nil, fmt.Errorf("sign X509-SVID: SPIFFE ID is empty: %w", ErrInvalidSVIDRequest)
	}
	if !req.ID.MemberOf(a.TrustDomain) {
		return nil, fmt.Errorf("sign X509-SVID for %s (CA trust domain %q): %w", req.ID, a.TrustDomain.Name(), ErrForeignID)
	}
	// X509-SVID section 3.1: a leaf's SPIFFE ID must have a path; the bare
	// trust domain ID names the CA, not a workload.
	if req.ID.Path() == "" {
		return nil, fmt.Errorf("sign X509-SVID for %s: leaf SPIFFE ID needs a path: %w", req.ID, ErrInvalidSVIDRequest)
	}
	if req.TTL <= 0 {
		return nil, fmt.Errorf("sign X509-SVID for %s: TTL must be positive, got %s: %w", req.ID, req.TTL, ErrInvalidSVIDRequest)
	}
	if req.PublicKey == nil {
		return nil, fmt.Errorf("sign X509-SVID for %s: public key is nil: %w", req.ID, ErrInvalidSVIDRequest)
	}
	if err := checkSubjectKey(req.PublicKey); err != nil {
		return nil, fmt.Errorf("sign X509-SVID for %s: %w", req.ID, err)
	}
	if err := CheckSPIFFEID(req.ID.String()); err != nil {
		return nil, fmt.Errorf("sign X509-SVID: %w", err)
	}
	for _, name := range req.DNSNames {
		if err := CheckDNSName(name); err != nil {
			return nil, fmt.Errorf("sign X509-SVID for %s: %w", req.ID, err)
		}
	}

	now := req.Now
	if now.IsZero() {
		now = time.Now()
	}
	// Certificates carry whole seconds; truncating here makes the returned
	// NotBefore/NotAfter equal what peers will see.
	notBefore := now.Add(-svidClockSkew).Truncate(time.Second)
	notAfter := now.Add(req.TTL).Truncate(time.Second)
	if notAfter.After(a.Cert.NotAfter) {
		return nil, fmt.Errorf("sign X509-SVID for %s: TTL %s ends at %s but the CA has %s left (expires %s): %w",
			req.ID, req.TTL, notAfter.UTC().Format(time.RFC3339), a.RemainingLife(now).Truncate(time.Second),
			a.Cert.NotAfter.UTC().Format(time.RFC3339), ErrTTLExceedsCA)
	}

	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("sign X509-SVID for %s: %w", req.ID, err)
	}
	skid, err := subjectKeyID(req.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("sign X509-SVID for %s: %w", req.ID, err)
	}
	ku := x509.KeyUsageDigitalSignature
	if _, ok := req.PublicKey.(*rsa.PublicKey); ok {
		ku |= x509.KeyUsageKeyEncipherment
	}
	der, err := a.signSVID(c, req, serial, notBefore, notAfter, skid, ku)
	if err != nil {
		return nil, fmt.Errorf("sign X509-SVID for %s: %w", req.ID, err)
	}
	return &X509SVID{
		ID:      req.ID,
		CertDER: der,
		// Fresh outer slice so a caller appending to it cannot corrupt the
		// cache; the DER bytes themselves are shared and must not be mutated.
		ChainDER:  append([][]byte(nil), c.chainDER...),
		Serial:    serial.Text(16),
		NotBefore: notBefore,
		NotAfter:  notAfter,
	}, nil
}

// signSVID makes the certificate DER. By default that is
// x509.CreateCertificate, which verifies the signature it made before
// returning it (for RSA keys that also keeps an RSA-CRT fault from publishing
// a signature that reveals the CA key). With EnableFastSign, in-process ECDSA
// CA keys take the hand-built path in fastsign.go, and a sample of its output
// is checked here; a failed check discards that certificate, turns the fast
// path off and signs with CreateCertificate instead.
func (a *Authority) signSVID(c *signCache, req SVIDRequest, serial *big.Int, notBefore, notAfter time.Time, skid []byte, ku x509.KeyUsage) ([]byte, error) {
	if f := c.fast; f.usable(a.Key) {
		// Equal to req.ID.URL().String(): SPIFFE IDs only contain characters
		// that url.URL does not escape.
		uri := req.ID.String()
		der, err := f.sign(rand.Reader, &svidFields{
			serial:    serial,
			notBefore: notBefore,
			notAfter:  notAfter,
			pub:       req.PublicKey,
			skid:      skid,
			keyUsage:  ku,
			uri:       uri,
			dnsNames:  req.DNSNames,
		})
		if err == nil && fastSampled(f.signed.Add(1)) {
			err = checkFastSVID(der, a.Cert, uri, req.PublicKey)
		}
		if err == nil {
			return der, nil
		}
		if f.off.CompareAndSwap(false, true) {
			c.fastOpts.report(a.Cert, err)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, svidTemplate(c.leafSubject, serial, notBefore, notAfter, skid, ku, req.ID, req.DNSNames), a.Cert, req.PublicKey, a.Key)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	return der, nil
}

// svidTemplate is the CreateCertificate template for an SVID. The ECDSA fast
// path in fastsign.go must produce exactly what CreateCertificate makes of
// it; the canary and FuzzFastSignEqualsStdlib check that byte for byte.
func svidTemplate(leafSubject []byte, serial *big.Int, notBefore, notAfter time.Time, skid []byte, ku x509.KeyUsage, id spiffeid.ID, dnsNames []string) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial,
		RawSubject:            leafSubject,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		IsCA:                  false,
		KeyUsage:              ku,
		ExtKeyUsage:           svidExtKeyUsage,
		SubjectKeyId:          skid,
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              dnsNames,
	}
}

// MintX509SVID generates a key of type kt (P-256 when empty) and signs an
// X509-SVID for it. It serves callers that cannot make their own key, such as
// `meshid dev`; agents send CSRs so private keys stay on the node.
func (a *Authority) MintX509SVID(id spiffeid.ID, kt KeyType, dnsNames []string, ttl time.Duration, now time.Time) (*X509SVID, error) {
	if kt == "" {
		kt = KeyP256
	}
	key, err := GenerateKey(kt)
	if err != nil {
		return nil, fmt.Errorf("mint X509-SVID for %s: %w", id, err)
	}
	svid, err := a.SignX509SVID(SVIDRequest{
		ID:        id,
		PublicKey: key.Public(),
		DNSNames:  dnsNames,
		TTL:       ttl,
		Now:       now,
	})
	if err != nil {
		return nil, err
	}
	svid.Key = key
	return svid, nil
}

// CheckDNSName accepts RFC 1123 host names, optionally with a leading "*."
// wildcard label for gateways. Go's x509 would encode almost any string, and
// a malformed SAN only surfaces later as an opaque handshake failure, so we
// refuse it up front.
//
// It is the one rule for DNS SANs: the admin API checks entries and mint
// requests with it, and SignX509SVID checks again, so nothing is accepted
// that the CA would then refuse to sign.
func CheckDNSName(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("DNS name %q: %s: %w", name, why, ErrInvalidSVIDRequest)
	}
	if name == "" {
		return bad("empty")
	}
	if len(name) > 253 {
		return bad("longer than 253 characters")
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return bad("is an IP address, not a host name")
	}
	host := name
	if len(host) >= 2 && host[0] == '*' && host[1] == '.' {
		host = host[2:]
	}
	labels := 0
	start := 0
	for i := 0; i <= len(host); i++ {
		if i < len(host) && host[i] != '.' {
			continue
		}
		label := host[start:i]
		start = i + 1
		labels++
		switch {
		case label == "":
			return bad("empty label")
		case len(label) > 63:
			return bad("label longer than 63 characters")
		case label[0] == '-' || label[len(label)-1] == '-':
			return bad("label starts or ends with a hyphen")
		}
		for j := 0; j < len(label); j++ {
			ch := label[j]
			if !('a' <= ch && ch <= 'z' || 'A' <= ch && ch <= 'Z' || '0' <= ch && ch <= '9' || ch == '-') {
				return bad(fmt.Sprintf("invalid character %q", ch))
			}
		}
	}
	if host != name && labels < 2 {
		// "*.com"-style wildcards are refused by every TLS stack.
		return bad("wildcard needs at least two labels after it")
	}
	return nil
}
