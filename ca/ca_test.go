package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	testTD  = spiffeid.RequireTrustDomainFromString("cluster.local")
	testID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")
	testNow = time.Date(2026, 3, 1, 12, 0, 0, 500_000_000, time.UTC)
)

var allKeyTypes = []KeyType{KeyP256, KeyP384, KeyRSA2048, KeyRSA3072, KeyEd25519}

// rootCache avoids regenerating RSA-3072 roots in every test; the roots are
// never mutated by tests that use it.
var rootCache sync.Map // KeyType -> *Authority

func testRoot(t testing.TB, kt KeyType) *Authority {
	t.Helper()
	if a, ok := rootCache.Load(kt); ok {
		return a.(*Authority)
	}
	a, err := NewRoot(testTD, kt, 365*24*time.Hour, testNow)
	if err != nil {
		t.Fatalf("NewRoot(%s): %v", kt, err)
	}
	rootCache.Store(kt, a)
	return a
}

// spkiBits extracts the subjectPublicKey BIT STRING contents independently of
// the production fast paths, so the SKID check is not circular.
func spkiBits(t *testing.T, pub crypto.PublicKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		t.Fatal(err)
	}
	return spki.PublicKey.Bytes
}

func TestGenerateKey(t *testing.T) {
	tests := []struct {
		kt    KeyType
		check func(crypto.Signer) bool
	}{
		{KeyP256, func(k crypto.Signer) bool { e, ok := k.(*ecdsa.PrivateKey); return ok && e.Curve == elliptic.P256() }},
		{KeyP384, func(k crypto.Signer) bool { e, ok := k.(*ecdsa.PrivateKey); return ok && e.Curve == elliptic.P384() }},
		{KeyRSA2048, func(k crypto.Signer) bool { r, ok := k.(*rsa.PrivateKey); return ok && r.N.BitLen() == 2048 }},
		{KeyRSA3072, func(k crypto.Signer) bool { r, ok := k.(*rsa.PrivateKey); return ok && r.N.BitLen() == 3072 }},
		{KeyEd25519, func(k crypto.Signer) bool { _, ok := k.(ed25519.PrivateKey); return ok }},
	}
	for _, tt := range tests {
		t.Run(string(tt.kt), func(t *testing.T) {
			k, err := GenerateKey(tt.kt)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(k) {
				t.Fatalf("GenerateKey(%s) returned %T", tt.kt, k)
			}
		})
	}
	for _, bad := range []KeyType{"", "ec-p521", "rsa-1024", "EC-P256"} {
		if _, err := GenerateKey(bad); !errors.Is(err, ErrUnsupportedKey) {
			t.Errorf("GenerateKey(%q) = %v, want ErrUnsupportedKey", bad, err)
		}
	}
}

func TestParseKeyType(t *testing.T) {
	tests := []struct {
		in   string
		want KeyType
		err  bool
	}{
		{"ec-p256", KeyP256, false},
		{"EC-P384", KeyP384, false},
		{" rsa-2048 ", KeyRSA2048, false},
		{"rsa-3072", KeyRSA3072, false},
		{"ed25519", KeyEd25519, false},
		{"", "", true},
		{"rsa", "", true},
		{"p256", "", true},
	}
	for _, tt := range tests {
		got, err := ParseKeyType(tt.in)
		if tt.err {
			if !errors.Is(err, ErrUnsupportedKey) {
				t.Errorf("ParseKeyType(%q) err = %v, want ErrUnsupportedKey", tt.in, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseKeyType(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestNewRoot(t *testing.T) {
	tests := []struct {
		kt      KeyType
		wantPub func(crypto.PublicKey) bool
		wantErr error
	}{
		{"", func(p crypto.PublicKey) bool { e, ok := p.(*ecdsa.PublicKey); return ok && e.Curve == elliptic.P256() }, nil},
		{KeyP256, func(p crypto.PublicKey) bool { e, ok := p.(*ecdsa.PublicKey); return ok && e.Curve == elliptic.P256() }, nil},
		{KeyP384, func(p crypto.PublicKey) bool { e, ok := p.(*ecdsa.PublicKey); return ok && e.Curve == elliptic.P384() }, nil},
		{KeyRSA3072, func(p crypto.PublicKey) bool { r, ok := p.(*rsa.PublicKey); return ok && r.N.BitLen() == 3072 }, nil},
		{KeyRSA2048, nil, ErrUnsupportedKey},
		{KeyEd25519, nil, ErrUnsupportedKey},
		{"dsa", nil, ErrUnsupportedKey},
	}
	for _, tt := range tests {
		t.Run("kt="+string(tt.kt), func(t *testing.T) {
			var a *Authority
			var err error
			if tt.wantErr == nil && tt.kt != "" {
				a = testRoot(t, tt.kt)
			} else {
				a, err = NewRoot(testTD, tt.kt, 365*24*time.Hour, testNow)
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("NewRoot(%q) err = %v, want %v", tt.kt, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c := a.Cert
			if !tt.wantPub(c.PublicKey) {
				t.Errorf("public key %T is not %q", c.PublicKey, tt.kt)
			}
			if !c.BasicConstraintsValid || !c.IsCA {
				t.Error("root is not a CA")
			}
			if want := x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature; c.KeyUsage != want {
				t.Errorf("KeyUsage = %v, want %v", c.KeyUsage, want)
			}
			if want := sha1.Sum(spkiBits(t, c.PublicKey)); !bytes.Equal(c.SubjectKeyId, want[:]) {
				t.Errorf("SKID = %x, want %x", c.SubjectKeyId, want)
			}
			if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://cluster.local" {
				t.Errorf("URIs = %v, want [spiffe://cluster.local]", c.URIs)
			}
			if !slices.Equal(c.PermittedURIDomains, []string{"cluster.local"}) {
				t.Errorf("PermittedURIDomains = %v", c.PermittedURIDomains)
			}
			if !c.PermittedDNSDomainsCritical || !extensionCritical(c, asn1.ObjectIdentifier{2, 5, 29, 30}) {
				t.Error("name constraints extension is not critical")
			}
			if !slices.Equal(c.Subject.Organization, []string{"meshid"}) || !strings.HasPrefix(c.Subject.CommonName, "meshid CA cluster.local") {
				t.Errorf("Subject = %v", c.Subject)
			}
			if want := testNow.Add(-time.Minute).Truncate(time.Second); !c.NotBefore.Equal(want) {
				t.Errorf("NotBefore = %v, want %v", c.NotBefore, want)
			}
			if want := testNow.Add(365 * 24 * time.Hour).Truncate(time.Second); !c.NotAfter.Equal(want) {
				t.Errorf("NotAfter = %v, want %v", c.NotAfter, want)
			}
			checkSerial(t, c.SerialNumber)
			if err := c.CheckSignatureFrom(c); err != nil {
				t.Errorf("root is not self-signed: %v", err)
			}
			if a.Root() != c {
				t.Error("Root() of a self-signed CA is not its Cert")
			}
		})
	}

	t.Run("two roots differ", func(t *testing.T) {
		a1, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
		if err != nil {
			t.Fatal(err)
		}
		a2, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
		if err != nil {
			t.Fatal(err)
		}
		if a1.Cert.Subject.CommonName == a2.Cert.Subject.CommonName {
			t.Errorf("two roots share CN %q", a1.Cert.Subject.CommonName)
		}
		if Fingerprint(a1.Cert) == Fingerprint(a2.Cert) {
			t.Error("two roots share a fingerprint")
		}
	})
	t.Run("bad ttl", func(t *testing.T) {
		if _, err := NewRoot(testTD, KeyP256, 0, testNow); err == nil {
			t.Error("NewRoot with TTL 0 succeeded")
		}
	})
}

func extensionCritical(c *x509.Certificate, oid asn1.ObjectIdentifier) bool {
	for _, e := range c.Extensions {
		if e.Id.Equal(oid) {
			return e.Critical
		}
	}
	return false
}

func checkSerial(t *testing.T, s *big.Int) {
	t.Helper()
	if s.Sign() <= 0 {
		t.Errorf("serial %v is not positive", s)
	}
	// A uniformly random 127-bit value is below 2^96 with probability 2^-31.
	if s.BitLen() > 127 || s.BitLen() < 96 {
		t.Errorf("serial has %d bits, want 96..127 (random 128-bit with top bit clear)", s.BitLen())
	}
}

// checkSVID asserts everything the X509-SVID standard and DESIGN.md require of
// a leaf, and that independent verifiers accept it.
func checkSVID(t *testing.T, a *Authority, s *X509SVID, id spiffeid.ID, pub crypto.PublicKey, dns []string, now time.Time, ttl time.Duration) {
	t.Helper()
	leaf, err := x509.ParseCertificate(s.CertDER)
	if err != nil {
		t.Fatalf("parse leaf: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URIs = %v, want exactly [%s]", leaf.URIs, id)
	}
	if !slices.Equal(leaf.DNSNames, dns) {
		t.Errorf("DNSNames = %v, want %v", leaf.DNSNames, dns)
	}
	if len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Errorf("unexpected SANs: ip=%v email=%v", leaf.IPAddresses, leaf.EmailAddresses)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("BasicConstraintsValid=%v IsCA=%v, want true/false", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	wantKU := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		wantKU |= x509.KeyUsageKeyEncipherment
	}
	if leaf.KeyUsage != wantKU {
		t.Errorf("KeyUsage = %b, want %b", leaf.KeyUsage, wantKU)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) || len(leaf.UnknownExtKeyUsage) != 0 {
		t.Errorf("ExtKeyUsage = %v (+%v), want [serverAuth clientAuth]", leaf.ExtKeyUsage, leaf.UnknownExtKeyUsage)
	}
	if want := sha1.Sum(spkiBits(t, pub)); !bytes.Equal(leaf.SubjectKeyId, want[:]) {
		t.Errorf("SKID = %x, want %x", leaf.SubjectKeyId, want)
	}
	if !bytes.Equal(leaf.AuthorityKeyId, a.Cert.SubjectKeyId) || len(leaf.AuthorityKeyId) == 0 {
		t.Errorf("AKID = %x, want CA SKID %x", leaf.AuthorityKeyId, a.Cert.SubjectKeyId)
	}
	if !slices.Equal(leaf.Subject.Organization, []string{"meshid"}) {
		t.Errorf("Subject = %v", leaf.Subject)
	}
	if p, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !p.Equal(pub) {
		t.Error("leaf does not carry the requested public key")
	}
	if want := now.Add(-10 * time.Second).Truncate(time.Second); !leaf.NotBefore.Equal(want) || !s.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v (returned %v), want %v", leaf.NotBefore, s.NotBefore, want)
	}
	if want := now.Add(ttl).Truncate(time.Second); !leaf.NotAfter.Equal(want) || !s.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v (returned %v), want %v", leaf.NotAfter, s.NotAfter, want)
	}
	checkSerial(t, leaf.SerialNumber)
	if s.Serial != leaf.SerialNumber.Text(16) || s.Serial != strings.ToLower(s.Serial) {
		t.Errorf("Serial = %q, cert has %x", s.Serial, leaf.SerialNumber)
	}
	if s.ID != id {
		t.Errorf("ID = %v, want %v", s.ID, id)
	}

	root := a.Root()
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, d := range s.ChainDER {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
	}
	verifyAt := now
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: verifyAt,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		t.Errorf("x509.Verify: %v", err)
	}
	bundle := x509bundle.FromX509Authorities(a.TrustDomain, []*x509.Certificate{root})
	raw := append([][]byte{s.CertDER}, s.ChainDER...)
	gotID, _, err := x509svid.ParseAndVerify(raw, bundle, x509svid.WithTime(verifyAt))
	if err != nil {
		t.Errorf("x509svid.ParseAndVerify: %v", err)
	} else if gotID != id {
		t.Errorf("x509svid.ParseAndVerify ID = %v, want %v", gotID, id)
	}
}

func TestMintX509SVID(t *testing.T) {
	for _, caKT := range []KeyType{KeyP256, KeyP384, KeyRSA3072} {
		a := testRoot(t, caKT)
		for _, kt := range append([]KeyType{""}, allKeyTypes...) {
			t.Run("ca="+string(caKT)+"/svid="+string(kt), func(t *testing.T) {
				dns := []string{"web.default.svc", "web.default.svc.cluster.local"}
				ttl := 24 * time.Hour
				s, err := a.MintX509SVID(testID, kt, dns, ttl, testNow)
				if err != nil {
					t.Fatal(err)
				}
				if s.Key == nil {
					t.Fatal("minted SVID has no key")
				}
				if kt == "" {
					if k, ok := s.Key.(*ecdsa.PrivateKey); !ok || k.Curve != elliptic.P256() {
						t.Errorf("default key is %T, want P-256", s.Key)
					}
				}
				checkSVID(t, a, s, testID, s.Key.Public(), dns, testNow, ttl)

				// What a caller writes to disk must round-trip through
				// go-spiffe's own parser, which also checks the key matches.
				keyPEM, err := EncodeKeyPEM(s.Key)
				if err != nil {
					t.Fatal(err)
				}
				parsed, err := x509svid.Parse(s.ChainPEM(), keyPEM)
				if err != nil {
					t.Fatalf("x509svid.Parse: %v", err)
				}
				if parsed.ID != testID {
					t.Errorf("x509svid.Parse ID = %v", parsed.ID)
				}
			})
		}
	}
}

func TestSerialsDiffer(t *testing.T) {
	a := testRoot(t, KeyP256)
	key, err := GenerateKey(KeyP256)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for i := 0; i < 200; i++ {
		s, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: key.Public(), TTL: time.Hour, Now: testNow})
		if err != nil {
			t.Fatal(err)
		}
		if seen[s.Serial] {
			t.Fatalf("serial %s repeated after %d mints", s.Serial, i)
		}
		seen[s.Serial] = true
		if len(s.Serial) > 32 {
			t.Fatalf("serial %s longer than 128 bits", s.Serial)
		}
	}
}

func TestTTLExceedsCA(t *testing.T) {
	a, err := NewRoot(testTD, KeyP256, 48*time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := GenerateKey(KeyP256)
	remaining := a.RemainingLife(testNow)
	if remaining <= 47*time.Hour || remaining > 48*time.Hour {
		t.Fatalf("RemainingLife = %v", remaining)
	}
	tests := []struct {
		name string
		now  time.Time
		ttl  time.Duration
		ok   bool
	}{
		{"well inside", testNow, 24 * time.Hour, true},
		{"exactly to CA end", testNow, remaining, true},
		{"one second past", testNow, remaining + time.Second, false},
		{"far past", testNow, 72 * time.Hour, false},
		{"late in CA life", testNow.Add(40 * time.Hour), 24 * time.Hour, false},
		{"CA expired", testNow.Add(49 * time.Hour), time.Minute, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: key.Public(), TTL: tt.ttl, Now: tt.now})
			if tt.ok {
				if err != nil {
					t.Fatal(err)
				}
				if s.NotAfter.After(a.Cert.NotAfter) {
					t.Errorf("SVID NotAfter %v beyond CA %v", s.NotAfter, a.Cert.NotAfter)
				}
				return
			}
			if !errors.Is(err, ErrTTLExceedsCA) {
				t.Fatalf("err = %v, want ErrTTLExceedsCA", err)
			}
			if !strings.Contains(err.Error(), "left") {
				t.Errorf("error %q does not say the CA's remaining life", err)
			}
		})
	}
}

func TestSignRejects(t *testing.T) {
	a := testRoot(t, KeyP256)
	good, _ := GenerateKey(KeyP256)
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	base := SVIDRequest{ID: testID, PublicKey: good.Public(), TTL: time.Hour, Now: testNow}
	with := func(f func(*SVIDRequest)) SVIDRequest { r := base; f(&r); return r }
	tests := []struct {
		name string
		req  SVIDRequest
		want error
	}{
		{"foreign td", with(func(r *SVIDRequest) { r.ID = spiffeid.RequireFromString("spiffe://evil.example/ns/default/sa/web") }), ErrForeignID},
		{"td suffix is still foreign", with(func(r *SVIDRequest) { r.ID = spiffeid.RequireFromString("spiffe://x.cluster.local/a") }), ErrForeignID},
		{"zero id", with(func(r *SVIDRequest) { r.ID = spiffeid.ID{} }), ErrInvalidSVIDRequest},
		{"trust domain id", with(func(r *SVIDRequest) { r.ID = testTD.ID() }), ErrInvalidSVIDRequest},
		{"zero ttl", with(func(r *SVIDRequest) { r.TTL = 0 }), ErrInvalidSVIDRequest},
		{"negative ttl", with(func(r *SVIDRequest) { r.TTL = -time.Hour }), ErrInvalidSVIDRequest},
		{"nil key", with(func(r *SVIDRequest) { r.PublicKey = nil }), ErrInvalidSVIDRequest},
		{"rsa-1024", with(func(r *SVIDRequest) { r.PublicKey = rsa1024.Public() }), ErrUnsupportedKey},
		{"p-224", with(func(r *SVIDRequest) { r.PublicKey = p224.Public() }), ErrUnsupportedKey},
	}
	for _, name := range []string{"", "-web.svc", "web-.svc", "a..b", "a_b.svc", "exa mple.com", ".svc", "svc.",
		"10.0.0.1", "::1", "*.com", "*", "a.*.svc", strings.Repeat("a", 64) + ".svc", strings.Repeat("a.", 127) + "aa", "wéb.svc"} {
		tests = append(tests, struct {
			name string
			req  SVIDRequest
			want error
		}{"dns " + name, with(func(r *SVIDRequest) { r.DNSNames = []string{"ok.svc", name} }), ErrInvalidSVIDRequest})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.SignX509SVID(tt.req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}

	for _, name := range []string{"web", "web.default.svc.cluster.local", "*.example.com", "xn--bcher-kva.example", "a-b.c1", strings.Repeat("a", 63) + ".svc"} {
		if _, err := a.SignX509SVID(with(func(r *SVIDRequest) { r.DNSNames = []string{name} })); err != nil {
			t.Errorf("DNS name %q rejected: %v", name, err)
		}
	}
}

func makeCSR(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "ignored"},
		// Requested SANs must not influence what gets issued.
		URIs: []*url.URL{{Scheme: "spiffe", Host: "evil.example", Path: "/admin"}},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestCSR(t *testing.T) {
	a := testRoot(t, KeyP256)
	for _, kt := range allKeyTypes {
		for _, form := range []string{"der", "pem"} {
			t.Run(string(kt)+"/"+form, func(t *testing.T) {
				key, err := GenerateKey(kt)
				if err != nil {
					t.Fatal(err)
				}
				in := makeCSR(t, key)
				if form == "pem" {
					in = append([]byte("\n"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: in})...)
				}
				csr, err := ParseCSR(in)
				if err != nil {
					t.Fatal(err)
				}
				s, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: csr.PublicKey, TTL: time.Hour, Now: testNow})
				if err != nil {
					t.Fatal(err)
				}
				if s.Key != nil {
					t.Error("CSR-signed SVID has a private key")
				}
				checkSVID(t, a, s, testID, key.Public(), nil, testNow, time.Hour)
			})
		}
	}

	good := makeCSR(t, mustKey(t, KeyP256))
	parsed, err := x509.ParseCertificateRequest(good)
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Clone(good)
	i := bytes.LastIndex(tampered, parsed.Signature)
	if i < 0 {
		t.Fatal("signature not found in CSR DER")
	}
	// Flip a bit in the last byte of S: the DER structure stays intact, so
	// only the signature check can catch it.
	tampered[i+len(parsed.Signature)-1] ^= 0x01
	tamperedSubject := bytes.Clone(good)
	j := bytes.Index(tamperedSubject, []byte("ignored"))
	tamperedSubject[j] = 'I'

	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	bad := []struct {
		name, reason string
		in           []byte
		alsoIs       error
	}{
		{"garbage", "malformed", []byte("this is not a CSR"), nil},
		{"empty", "malformed", nil, nil},
		{"truncated", "malformed", good[:len(good)/2], nil},
		{"tampered signature", "bad signature", tampered, nil},
		{"tampered body", "bad signature", tamperedSubject, nil},
		{"broken pem", "malformed PEM", []byte("-----BEGIN CERTIFICATE REQUEST-----\n!!!"), nil},
		{"wrong pem type", "CERTIFICATE", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good}), nil},
		{"rsa-1024", "1024 bits", makeCSR(t, rsa1024), ErrUnsupportedKey},
		{"p-224", "P-224", makeCSR(t, p224), ErrUnsupportedKey},
	}
	for _, tt := range bad {
		t.Run("bad/"+tt.name, func(t *testing.T) {
			_, err := ParseCSR(tt.in)
			if !errors.Is(err, ErrBadCSR) {
				t.Fatalf("err = %v, want ErrBadCSR", err)
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("err %q does not mention %q", err, tt.reason)
			}
			if tt.alsoIs != nil && !errors.Is(err, tt.alsoIs) {
				t.Errorf("err = %v, want it to also wrap %v", err, tt.alsoIs)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("err %q is not one line", err)
			}
		})
	}
}

func mustKey(t testing.TB, kt KeyType) crypto.Signer {
	t.Helper()
	k, err := GenerateKey(kt)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNameConstraint shows the root's URI constraint is what stops a leaked
// CA key from minting identities for another trust domain: the same hand-made
// leaf verifies for our trust domain and fails for a foreign one.
func TestNameConstraint(t *testing.T) {
	a := testRoot(t, KeyP256)
	roots := x509.NewCertPool()
	roots.AddCert(a.Cert)
	leafKey := mustKey(t, KeyP256)
	for _, tt := range []struct {
		uri string
		ok  bool
	}{
		{"spiffe://cluster.local/ns/default/sa/web", true},
		{"spiffe://other.example/ns/default/sa/web", false},
		// Not tested: spiffe://sub.cluster.local. Go's verifier treats a URI
		// domain constraint as also permitting subdomains (RFC 5280 says
		// exact host), so it would pass here; SignX509SVID refuses such IDs
		// with ErrForeignID, which TestSignRejects covers.
	} {
		t.Run(tt.uri, func(t *testing.T) {
			u, _ := url.Parse(tt.uri)
			der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
				SerialNumber:          big.NewInt(42),
				NotBefore:             testNow.Add(-time.Minute),
				NotAfter:              testNow.Add(time.Hour),
				BasicConstraintsValid: true,
				KeyUsage:              x509.KeyUsageDigitalSignature,
				ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
				URIs:                  []*url.URL{u},
			}, a.Cert, leafKey.Public(), a.Key)
			if err != nil {
				t.Fatal(err)
			}
			leaf, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: testNow, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			if tt.ok {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				return
			}
			var cie x509.CertificateInvalidError
			if !errors.As(err, &cie) || cie.Reason != x509.CANotAuthorizedForThisName {
				t.Fatalf("Verify err = %v, want CANotAuthorizedForThisName", err)
			}
		})
	}
}

func TestLoadAuthority(t *testing.T) {
	root := testRoot(t, KeyP256)

	t.Run("round trip", func(t *testing.T) {
		a, err := LoadAuthority(root.Cert.Raw, nil, root.Key, testTD)
		if err != nil {
			t.Fatal(err)
		}
		if Fingerprint(a.Cert) != Fingerprint(root.Cert) || a.Root() != a.Cert {
			t.Fatal("loaded a different CA")
		}
		s, err := a.MintX509SVID(testID, KeyP256, nil, time.Hour, testNow)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.ChainDER) != 0 {
			t.Errorf("self-signed root: ChainDER has %d certs, want 0", len(s.ChainDER))
		}
		checkSVID(t, root, s, testID, s.Key.Public(), nil, testNow, time.Hour)
	})

	// An intermediate under the root: SVIDs must carry it, and verify against
	// a bundle holding only the root.
	interKey := mustKey(t, KeyP256)
	interDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		Subject:               pkix.Name{Organization: []string{"meshid"}, CommonName: "meshid intermediate"},
		NotBefore:             testNow.Add(-time.Minute),
		NotAfter:              testNow.Add(30 * 24 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{testTD.ID().URL()},
	}, root.Cert, interKey.Public(), root.Key)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("intermediate", func(t *testing.T) {
		a, err := LoadAuthority(interDER, [][]byte{root.Cert.Raw}, interKey, testTD)
		if err != nil {
			t.Fatal(err)
		}
		if a.Root() != a.Chain[0] || Fingerprint(a.Root()) != Fingerprint(root.Cert) {
			t.Error("Root() is not the top of the chain")
		}
		s, err := a.MintX509SVID(testID, KeyEd25519, []string{"web"}, time.Hour, testNow)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.ChainDER) != 1 || !bytes.Equal(s.ChainDER[0], interDER) {
			t.Fatalf("ChainDER = %d certs, want just the intermediate", len(s.ChainDER))
		}
		checkSVID(t, a, s, testID, s.Key.Public(), []string{"web"}, testNow, time.Hour)
		if n := bytes.Count(s.ChainPEM(), []byte("BEGIN CERTIFICATE")); n != 2 {
			t.Errorf("ChainPEM has %d certificates, want leaf+intermediate", n)
		}
	})

	other := testRoot(t, KeyP384)
	otherTD, err := NewRoot(spiffeid.RequireTrustDomainFromString("other.example"), KeyP256, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := root.MintX509SVID(testID, KeyP256, nil, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		name  string
		cert  []byte
		chain [][]byte
		key   crypto.Signer
	}{
		{"garbage cert", []byte("nope"), nil, root.Key},
		{"wrong key", root.Cert.Raw, nil, other.Key},
		{"nil key", root.Cert.Raw, nil, nil},
		{"leaf is not a CA", svid.CertDER, nil, svid.Key},
		{"constraint excludes td", otherTD.Cert.Raw, nil, otherTD.Key},
		{"chain did not sign", interDER, [][]byte{other.Cert.Raw}, interKey},
		{"garbage chain", interDER, [][]byte{[]byte("nope")}, interKey},
	}
	for _, tt := range bad {
		t.Run("bad/"+tt.name, func(t *testing.T) {
			if _, err := LoadAuthority(tt.cert, tt.chain, tt.key, testTD); err == nil {
				t.Fatal("LoadAuthority succeeded")
			}
		})
	}
}

// TestAuthorityLiteral covers Authorities built without a constructor, and
// that swapping the CA in place does not keep signing with stale cached state.
func TestAuthorityLiteral(t *testing.T) {
	r1, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := NewRoot(testTD, KeyP384, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	a := &Authority{Cert: r1.Cert, Key: r1.Key, TrustDomain: testTD}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
			if err == nil {
				_, _, err = x509svid.ParseAndVerify([][]byte{s.CertDER}, x509bundle.FromX509Authorities(testTD, []*x509.Certificate{r1.Cert}), x509svid.WithTime(testNow))
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	a.Cert, a.Key = r2.Cert, r2.Key
	s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, r2, s, testID, s.Key.Public(), nil, testNow, time.Minute)

	if _, err := (&Authority{}).MintX509SVID(testID, KeyP256, nil, time.Minute, testNow); err == nil {
		t.Error("empty Authority signed")
	}
}

func TestFingerprint(t *testing.T) {
	c := testRoot(t, KeyP256).Cert
	want := sha256.Sum256(c.Raw)
	if got := Fingerprint(c); got != hex.EncodeToString(want[:]) || len(got) != 64 || got != strings.ToLower(got) {
		t.Errorf("Fingerprint = %q", got)
	}
}

func TestPEM(t *testing.T) {
	if got := EncodeCertsPEM(); len(got) != 0 {
		t.Errorf("EncodeCertsPEM() = %q", got)
	}
	ders := [][]byte{{1, 2, 3}, bytes.Repeat([]byte{9}, 1000)}
	rest := EncodeCertsPEM(ders...)
	for i, want := range ders {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil || b.Type != "CERTIFICATE" || !bytes.Equal(b.Bytes, want) {
			t.Fatalf("block %d: %v", i, b)
		}
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		t.Errorf("trailing data %q", rest)
	}
	for _, kt := range allKeyTypes {
		key := mustKey(t, kt)
		p, err := EncodeKeyPEM(key)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(p)
		if b == nil || b.Type != "PRIVATE KEY" {
			t.Fatalf("%s: bad PEM %q", kt, p)
		}
		back, err := x509.ParsePKCS8PrivateKey(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if !back.(interface{ Equal(crypto.PrivateKey) bool }).Equal(key) {
			t.Errorf("%s: key does not round-trip", kt)
		}
	}
	if _, err := EncodeKeyPEM(opaqueSigner{}); err == nil {
		t.Error("EncodeKeyPEM of an opaque signer succeeded")
	}
}

// opaqueSigner stands in for an HSM/KMS key, which cannot be exported.
type opaqueSigner struct{}

func (opaqueSigner) Public() crypto.PublicKey { return nil }
func (opaqueSigner) Sign(_ io.Reader, _ []byte, _ crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("no")
}
