package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The tests in this file hold the ECDSA fast path (fastsign.go) to
// x509.CreateCertificate: for the same template, serial, times and keys the
// TBSCertificate must be byte-identical.

var (
	subjectKeysOnce sync.Once
	subjectKeys     map[KeyType]crypto.Signer
)

// testSubjectKeys returns one key per type, generated once (RSA-3072 takes a
// while).
func testSubjectKeys(t testing.TB) map[KeyType]crypto.Signer {
	t.Helper()
	subjectKeysOnce.Do(func() {
		subjectKeys = map[KeyType]crypto.Signer{}
		for _, kt := range allKeyTypes {
			k, err := GenerateKey(kt)
			if err != nil {
				panic(err)
			}
			subjectKeys[kt] = k
		}
	})
	return subjectKeys
}

// referenceTBS is what CreateCertificate produces for the SVID template.
func referenceTBS(t testing.TB, a *Authority, c *signCache, in *svidFields, id spiffeid.ID) []byte {
	t.Helper()
	tmpl := svidTemplate(c, in.serial, in.notBefore, in.notAfter, in.skid, in.keyUsage, id, in.dnsNames)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, in.pub, a.Key)
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse CreateCertificate output: %v", err)
	}
	return cert.RawTBSCertificate
}

// svidInputs fills svidFields the way SignX509SVID does.
func svidInputs(t testing.TB, pub crypto.PublicKey, serial *big.Int, nb, na time.Time, id spiffeid.ID, dns []string) *svidFields {
	t.Helper()
	skid, err := subjectKeyID(pub)
	if err != nil {
		t.Fatal(err)
	}
	ku := x509.KeyUsageDigitalSignature
	if _, ok := pub.(interface{ Size() int }); ok { // *rsa.PublicKey
		ku |= x509.KeyUsageKeyEncipherment
	}
	return &svidFields{
		serial: serial, notBefore: nb, notAfter: na, pub: pub, skid: skid,
		keyUsage: ku, uri: id.String(), dnsNames: dns,
	}
}

func fastPathOf(t testing.TB, a *Authority) (*signCache, *ecFastPath) {
	t.Helper()
	c, err := a.prepare()
	if err != nil {
		t.Fatal(err)
	}
	if !c.fast.usable(a.Key) {
		t.Fatalf("fast path not in use for a %T CA key", a.Key)
	}
	return c, c.fast
}

func requireSameDER(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	from := max(i-16, 0)
	t.Fatalf("%s differs from CreateCertificate at byte %d (len %d vs %d):\n got  ...%s\n want ...%s",
		what, i, len(got), len(want), hex.EncodeToString(got[from:min(i+32, len(got))]), hex.EncodeToString(want[from:min(i+32, len(want))]))
}

// TestFastPathMatchesCreateCertificate runs SignX509SVID itself (fast path)
// and the test hook, and compares both with CreateCertificate.
func TestFastPathMatchesCreateCertificate(t *testing.T) {
	keys := testSubjectKeys(t)
	windows := []struct {
		name string
		caAt time.Time // the CA is made at caAt and lives 3 years
		now  time.Time
		ttl  time.Duration
	}{
		{"2026", testNow, testNow, 24 * time.Hour},
		{"crossing 2050", time.Date(2049, 6, 1, 0, 0, 0, 0, time.UTC), time.Date(2049, 12, 31, 23, 59, 30, 250, time.UTC), time.Hour},
		{"notBefore 2050", time.Date(2049, 6, 1, 0, 0, 0, 0, time.UTC), time.Date(2050, 1, 1, 0, 0, 10, 0, time.UTC), time.Hour},
		{"after 2050", time.Date(2051, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(2052, 2, 29, 8, 0, 0, 0, time.UTC), 90 * 24 * time.Hour},
		// Callers may pass a local time; certificates carry UTC.
		{"non-UTC now", time.Date(2049, 6, 1, 0, 0, 0, 0, time.UTC), time.Date(2049, 12, 31, 20, 0, 0, 0, time.FixedZone("UTC+5:30", 5*3600+1800)), 10 * time.Hour},
		{"crossing 2000", time.Date(1999, 6, 1, 0, 0, 0, 0, time.UTC), time.Date(1999, 12, 31, 23, 30, 0, 0, time.UTC), time.Hour},
	}
	dnsSets := map[string][]string{"no dns": nil, "dns": {"web.default.svc", "*.web.default.svc.cluster.local", "a"}}
	for _, w := range windows {
		for _, caKT := range []KeyType{KeyP256, KeyP384} {
			a, err := NewRoot(testTD, caKT, 3*365*24*time.Hour, w.caAt)
			if err != nil {
				t.Fatal(err)
			}
			c, f := fastPathOf(t, a)
			for _, kt := range allKeyTypes {
				for dnsName, dns := range dnsSets {
					t.Run(fmt.Sprintf("%s/ca=%s/svid=%s/%s", w.name, caKT, kt, dnsName), func(t *testing.T) {
						pub := keys[kt].Public()
						s, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: pub, DNSNames: dns, TTL: w.ttl, Now: w.now})
						if err != nil {
							t.Fatal(err)
						}
						leaf, err := x509.ParseCertificate(s.CertDER)
						if err != nil {
							t.Fatalf("parse fast-path certificate: %v", err)
						}
						in := svidInputs(t, pub, leaf.SerialNumber, s.NotBefore, s.NotAfter, testID, dns)
						want := referenceTBS(t, a, c, in, testID)
						requireSameDER(t, "SignX509SVID TBSCertificate", leaf.RawTBSCertificate, want)

						hook, err := f.tbsCertificate(in)
						if err != nil {
							t.Fatal(err)
						}
						requireSameDER(t, "tbsCertificate hook", hook, want)

						if want := map[KeyType]x509.SignatureAlgorithm{KeyP256: x509.ECDSAWithSHA256, KeyP384: x509.ECDSAWithSHA384}[caKT]; leaf.SignatureAlgorithm != want {
							t.Errorf("signature algorithm %s, want %s", leaf.SignatureAlgorithm, want)
						}
						if err := leaf.CheckSignatureFrom(a.Cert); err != nil {
							t.Fatalf("signature: %v", err)
						}
						checkSVID(t, a, s, testID, pub, dns, w.now, w.ttl)
						// go-spiffe's Verify on the parsed chain, besides the
						// ParseAndVerify that checkSVID does.
						bundle := x509bundle.FromX509Authorities(testTD, []*x509.Certificate{a.Cert})
						if id, _, err := x509svid.Verify([]*x509.Certificate{leaf}, bundle, x509svid.WithTime(w.now)); err != nil || id != testID {
							t.Errorf("x509svid.Verify = %v, %v", id, err)
						}
					})
				}
			}
		}
	}
}

// TestFastPathRandomized compares the fast path with CreateCertificate over
// random serials, validity periods, SPIFFE IDs and DNS name lists.
func TestFastPathRandomized(t *testing.T) {
	keys := testSubjectKeys(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	caAt := time.Date(2040, 1, 1, 0, 0, 0, 0, time.UTC)
	var cas []*Authority
	for _, kt := range []KeyType{KeyP256, KeyP384} {
		a, err := NewRoot(testTD, kt, 30*365*24*time.Hour, caAt)
		if err != nil {
			t.Fatal(err)
		}
		cas = append(cas, a)
	}
	const alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
	label := func(maxLen int) string {
		n := 1 + rng.IntN(maxLen)
		var b strings.Builder
		for i := range n {
			ch := alnum[rng.IntN(len(alnum))]
			if i > 0 && i < n-1 && rng.IntN(6) == 0 {
				ch = '-'
			}
			b.WriteByte(ch)
		}
		return b.String()
	}
	const pathChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"

	for iter := range 200 {
		a := cas[rng.IntN(len(cas))]
		c, f := fastPathOf(t, a)
		kt := allKeyTypes[rng.IntN(len(allKeyTypes))]
		pub := keys[kt].Public()

		// Serial: 1..160 bits, including all-ones (top bit set, needs a
		// leading zero octet) and single-bit values.
		bits := 1 + rng.IntN(160)
		serial := new(big.Int)
		switch rng.IntN(4) {
		case 0:
			serial.Lsh(big.NewInt(1), uint(bits-1))
		case 1:
			serial.Sub(serial.Lsh(big.NewInt(1), uint(bits)), big.NewInt(1))
		default:
			b := make([]byte, (bits+7)/8)
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			serial.SetBytes(b)
			serial.SetBit(serial, bits-1, 1)
			serial.Rsh(serial, uint(len(b)*8-bits))
			serial.SetBit(serial, bits-1, 1)
		}

		// Times: anywhere in 2040..2060 so that about half cross 2050.
		now := caAt.Add(time.Duration(rng.Int64N(int64(20 * 365 * 24 * time.Hour)))).Add(time.Duration(rng.IntN(1e9)))
		if rng.IntN(4) == 0 {
			now = time.Date(2049, 12, 31, 23, 0, 0, 0, time.UTC).Add(time.Duration(rng.Int64N(int64(2 * time.Hour))))
		}
		if rng.IntN(3) == 0 {
			now = now.In(time.FixedZone("random", (rng.IntN(27)-12)*3600+rng.IntN(2)*1800))
		}
		ttl := time.Duration(1 + rng.Int64N(int64(3*24*time.Hour)))
		if rng.IntN(3) == 0 {
			ttl = time.Duration(1+rng.IntN(3600)) * time.Second
		}
		nb := now.Add(-svidClockSkew).Truncate(time.Second)
		na := now.Add(ttl).Truncate(time.Second)

		// SPIFFE ID with 1..4 random segments.
		var p strings.Builder
		for range 1 + rng.IntN(4) {
			p.WriteByte('/')
			n := 1 + rng.IntN(20)
			for range n {
				p.WriteByte(pathChars[rng.IntN(len(pathChars))])
			}
			if seg := p.String(); strings.HasSuffix(seg, "/.") || strings.HasSuffix(seg, "/..") {
				p.WriteByte('x')
			}
		}
		id, err := spiffeid.FromPath(testTD, p.String())
		if err != nil {
			t.Fatalf("iteration %d: ID path %q: %v", iter, p.String(), err)
		}

		// 0..6 DNS names, occasionally many long ones so lengths need two
		// and three octets.
		var dns []string
		nNames := rng.IntN(7)
		if rng.IntN(10) == 0 {
			nNames = 20 + rng.IntN(300)
		}
		for range nNames {
			var name strings.Builder
			if rng.IntN(5) == 0 {
				name.WriteString("*.")
			}
			name.WriteString(label(63))
			for range 1 + rng.IntN(3) {
				name.WriteByte('.')
				name.WriteString(label(40))
			}
			if err := CheckDNSName(name.String()); err != nil {
				t.Fatalf("iteration %d: generated bad name: %v", iter, err)
			}
			dns = append(dns, name.String())
		}

		in := svidInputs(t, pub, serial, nb, na, id, dns)
		want := referenceTBS(t, a, c, in, id)
		got, err := f.tbsCertificate(in)
		if err != nil {
			t.Fatalf("iteration %d: %v", iter, err)
		}
		requireSameDER(t, fmt.Sprintf("iteration %d (ca %s, svid %s, serial %x, %s..%s, %s, %d names)", iter, curveName(a.Cert.PublicKey.(*ecdsa.PublicKey).Curve), kt, serial, nb, na, id, len(dns)), got, want)

		// And the signed certificate around it.
		der, err := f.sign(rand.Reader, in)
		if err != nil {
			t.Fatalf("iteration %d: sign: %v", iter, err)
		}
		leaf, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("iteration %d: parse: %v", iter, err)
		}
		requireSameDER(t, fmt.Sprintf("iteration %d signed certificate's TBS", iter), leaf.RawTBSCertificate, want)
		if err := leaf.CheckSignatureFrom(a.Cert); err != nil {
			t.Fatalf("iteration %d: signature: %v", iter, err)
		}
	}
}

// TestFastPathScope checks which CA keys take the fast path, and that state
// cached for one key is never used to sign with another.
func TestFastPathScope(t *testing.T) {
	for _, kt := range []KeyType{KeyP256, KeyP384} {
		fastPathOf(t, testRoot(t, kt))
	}
	rsaCA := testRoot(t, KeyRSA3072)
	if c, err := rsaCA.prepare(); err != nil || c.fast != nil {
		t.Errorf("RSA CA: fast path state %v (err %v), want none", c.fast, err)
	}
	// An opaque signer with an ECDSA key (HSM/KMS) keeps CreateCertificate.
	p256 := testRoot(t, KeyP256)
	if f := newECFastPath(p256.Cert, struct{ crypto.Signer }{p256.Key}, []byte{0x30, 0}); f != nil {
		t.Error("fast path built for a wrapped signer")
	}

	// Swapping only the key must not sign with the old state: here the new
	// key does not match the certificate, which CreateCertificate refuses.
	a := &Authority{Cert: p256.Cert, Key: p256.Key, TrustDomain: testTD}
	if _, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow); err != nil {
		t.Fatal(err)
	}
	a.Key = mustKey(t, KeyP256)
	if s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow); err == nil {
		leaf, _ := x509.ParseCertificate(s.CertDER)
		t.Fatalf("signed with a key that does not match the CA certificate (signature check: %v)", leaf.CheckSignatureFrom(p256.Cert))
	}
	// Swapping to an RSA key with its certificate leaves the fast path.
	a.Cert, a.Key = rsaCA.Cert, rsaCA.Key
	c, err := a.prepare()
	if err != nil || c.fast.usable(a.Key) {
		t.Fatalf("fast path usable after switching to an RSA CA (err %v)", err)
	}
	s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, rsaCA, s, testID, s.Key.Public(), nil, testNow, time.Minute)
}

// TestDERLength checks the length helpers against encoding/asn1 across the
// short/long form boundaries.
func TestDERLength(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 129, 255, 256, 257, 65535, 65536, 1 << 20} {
		want, err := asn1.Marshal(asn1.RawValue{Tag: asn1.TagOctetString, Bytes: make([]byte, n)})
		if err != nil {
			t.Fatal(err)
		}
		got := appendDERLength([]byte{asn1.TagOctetString}, n)
		if !bytes.Equal(got, want[:len(want)-n]) || derTLVLen(n) != len(want) {
			t.Errorf("length %d: header %x (TLV %d), want %x (TLV %d)", n, got, derTLVLen(n), want[:len(want)-n], len(want))
		}
	}
	for _, v := range []int64{0, 1, 127, 128, 255, 256, 32767, 32768} {
		n := big.NewInt(v)
		want, _ := asn1.Marshal(n)
		l := derIntegerLen(n)
		got := appendDERInteger(appendDERLength([]byte{asn1.TagInteger}, l), n, l)
		if !bytes.Equal(got, want) {
			t.Errorf("INTEGER %d: %x, want %x", v, got, want)
		}
	}
}
