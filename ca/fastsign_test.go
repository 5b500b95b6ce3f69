package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The tests in this file hold the opt-in ECDSA fast path (fastsign.go) to
// x509.CreateCertificate: for the same template, serial, times and keys the
// TBSCertificate must be byte-identical. FuzzFastSignEqualsStdlib is in
// fastsign_fuzz_test.go.

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
	tmpl := svidTemplate(c.leafSubject, in.serial, in.notBefore, in.notAfter, in.skid, in.keyUsage, id, in.dnsNames)
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

// fastPathOf turns fast signing on for a, which must not be shared with
// other tests (so not one from testRoot), and returns its state.
func fastPathOf(t testing.TB, a *Authority) (*signCache, *ecFastPath) {
	t.Helper()
	if err := a.EnableFastSign(FastSignOptions{}); err != nil {
		t.Fatal(err)
	}
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

// TestFastSignOffByDefault: a new or loaded Authority signs with
// x509.CreateCertificate until EnableFastSign is called.
func TestFastSignOffByDefault(t *testing.T) {
	a, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadAuthority(a.Cert.Raw, nil, a.Key, testTD)
	if err != nil {
		t.Fatal(err)
	}
	for name, x := range map[string]*Authority{"NewRoot": a, "LoadAuthority": loaded} {
		c, err := x.prepare()
		if err != nil {
			t.Fatal(err)
		}
		if c.fast != nil || x.FastSignActive() {
			t.Errorf("%s: fast path built without EnableFastSign", name)
		}
		s, err := x.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
		if err != nil {
			t.Fatal(err)
		}
		checkSVID(t, x, s, testID, s.Key.Public(), nil, testNow, time.Minute)
	}
	if err := loaded.EnableFastSign(FastSignOptions{}); err != nil {
		t.Fatal(err)
	}
	if !loaded.FastSignActive() {
		t.Fatal("EnableFastSign succeeded but the fast path is not active")
	}
	s, err := loaded.MintX509SVID(testID, KeyP256, []string{"a.example"}, time.Minute, testNow)
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, loaded, s, testID, s.Key.Public(), []string{"a.example"}, testNow, time.Minute)
}

// TestFastPathScope checks which CA keys take the fast path, and that state
// cached for one key is never used to sign with another.
func TestFastPathScope(t *testing.T) {
	for _, kt := range []KeyType{KeyP256, KeyP384} {
		a, err := NewRoot(testTD, kt, time.Hour, testNow)
		if err != nil {
			t.Fatal(err)
		}
		fastPathOf(t, a)
	}
	rsaCA, err := NewRoot(testTD, KeyRSA3072, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	if err := rsaCA.EnableFastSign(FastSignOptions{}); err == nil || rsaCA.FastSignActive() {
		t.Errorf("RSA CA: EnableFastSign = %v, active %v; want an error and CreateCertificate", err, rsaCA.FastSignActive())
	}
	// An opaque signer with an ECDSA key (HSM/KMS) keeps CreateCertificate.
	p256, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	wrapped := &Authority{Cert: p256.Cert, Key: struct{ crypto.Signer }{p256.Key}, TrustDomain: testTD}
	if err := wrapped.EnableFastSign(FastSignOptions{}); err == nil {
		t.Error("fast path enabled for a wrapped signer")
	}
	if s, err := wrapped.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow); err != nil {
		t.Fatal(err)
	} else {
		checkSVID(t, p256, s, testID, s.Key.Public(), nil, testNow, time.Minute)
	}

	// Swapping only the key must not sign with the old state: here the new
	// key does not match the certificate, which CreateCertificate refuses.
	a := &Authority{Cert: p256.Cert, Key: p256.Key, TrustDomain: testTD}
	fastPathOf(t, a)
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
	if a.FastSignActive() {
		t.Fatal("fast path active after switching to an RSA CA")
	}
	s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, rsaCA, s, testID, s.Key.Public(), nil, testNow, time.Minute)
}

// failureRecorder collects what FastSignOptions reports.
type failureRecorder struct {
	mu   sync.Mutex
	errs []error
	log  strings.Builder
}

func (r *failureRecorder) options() FastSignOptions {
	return FastSignOptions{
		Logger: slog.New(slog.NewTextHandler(lockedWriter{r}, nil)),
		OnCheckFailure: func(err error) {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.errs = append(r.errs, err)
		},
	}
}

func (r *failureRecorder) failures() ([]error, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...), r.log.String()
}

type lockedWriter struct{ r *failureRecorder }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.r.mu.Lock()
	defer w.r.mu.Unlock()
	return w.r.log.Write(p)
}

// TestFastSignCanary: a fast path whose output differs from
// CreateCertificate's, or whose signature does not verify, is refused at
// EnableFastSign, reported, and signing stays on CreateCertificate.
func TestFastSignCanary(t *testing.T) {
	other := mustKey(t, KeyP256).(*ecdsa.PrivateKey)
	cases := map[string]struct {
		mutate  func(*ecFastPath)
		wantErr string
	}{
		// basicConstraints without critical: a different encoding.
		"encoding differs": {func(f *ecFastPath) {
			f.bcExt = extension(oidExtBasicConstraints, false, []byte{0x30, 0x00})
		}, "differs from x509.CreateCertificate"},
		// ECDSA over a SHA-384 digest while the certificate says SHA-256:
		// a signature that does not verify.
		"bad signature": {func(f *ecFastPath) { f.hash = crypto.SHA384 }, "signature"},
		// Signing with a key that is not the CA's.
		"wrong key": {func(f *ecFastPath) { f.key = other }, "signature"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			a, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
			if err != nil {
				t.Fatal(err)
			}
			var rec failureRecorder
			opts := rec.options()
			opts.mutate = tc.mutate
			err = a.EnableFastSign(opts)
			if !errors.Is(err, errFastSignCheck) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("EnableFastSign = %v, want a check failure mentioning %q", err, tc.wantErr)
			}
			errs, log := rec.failures()
			if len(errs) != 1 || !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "fast SVID signing turned off") {
				t.Errorf("reported %d failures, log %q; want one failure and an error log", len(errs), log)
			}
			if a.FastSignActive() {
				t.Error("fast path active after a failed canary")
			}
			s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
			if err != nil {
				t.Fatal(err)
			}
			checkSVID(t, a, s, testID, s.Key.Public(), nil, testNow, time.Minute)
		})
	}
}

// TestFastSignSampledCheck: when a sampled fast-path SVID fails the post-sign
// check, that certificate is not returned; the SVID is signed with
// CreateCertificate, the failure reported once, and the fast path is off from
// then on.
func TestFastSignSampledCheck(t *testing.T) {
	a, err := NewRoot(testTD, KeyP256, time.Hour, testNow)
	if err != nil {
		t.Fatal(err)
	}
	var rec failureRecorder
	if err := a.EnableFastSign(rec.options()); err != nil {
		t.Fatal(err)
	}
	c, f := fastPathOf2(t, a)
	// The canary passed; now the signer goes bad (digest of the wrong hash,
	// so every signature fails to verify).
	f.hash = crypto.SHA384
	for i := range 3 {
		s, err := a.MintX509SVID(testID, KeyP256, nil, time.Minute, testNow)
		if err != nil {
			t.Fatalf("SVID %d: %v", i, err)
		}
		checkSVID(t, a, s, testID, s.Key.Public(), nil, testNow, time.Minute)
	}
	errs, log := rec.failures()
	if len(errs) != 1 || !errors.Is(errs[0], errFastSignCheck) || !strings.Contains(log, "level=ERROR") {
		t.Errorf("reported %v, log %q; want one check failure and an error log", errs, log)
	}
	if a.FastSignActive() || c.fast.usable(a.Key) {
		t.Error("fast path still active after a failed sampled check")
	}
	if n := f.signed.Load(); n != 1 {
		t.Errorf("fast path signed %d SVIDs, want 1 (the one that failed the check)", n)
	}
}

// fastPathOf2 returns the fast-path state EnableFastSign built.
func fastPathOf2(t *testing.T, a *Authority) (*signCache, *ecFastPath) {
	t.Helper()
	c, err := a.prepare()
	if err != nil || c.fast == nil {
		t.Fatalf("no fast path (err %v)", err)
	}
	return c, c.fast
}

// TestFastSampled pins the sampling: the first fast-path SVID and one in
// fastVerifyEvery after it.
func TestFastSampled(t *testing.T) {
	var got []uint64
	for n := uint64(1); n <= 3*fastVerifyEvery; n++ {
		if fastSampled(n) {
			got = append(got, n)
		}
	}
	if want := []uint64{1, fastVerifyEvery + 1, 2*fastVerifyEvery + 1}; !slices.Equal(got, want) {
		t.Errorf("sampled %v, want %v", got, want)
	}
}

// TestMarshalSPKI: the fixed SPKI layouts are what x509 writes, for every
// subject key type.
func TestMarshalSPKI(t *testing.T) {
	for kt, k := range testSubjectKeys(t) {
		want, err := x509.MarshalPKIXPublicKey(k.Public())
		if err != nil {
			t.Fatal(err)
		}
		got, err := marshalSPKI(k.Public())
		if err != nil {
			t.Fatal(err)
		}
		requireSameDER(t, string(kt)+" SPKI", got, want)
	}
}
