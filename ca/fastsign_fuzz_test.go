package ca

import (
	"bytes"
	"crypto/x509"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	fuzzCAsOnce sync.Once
	fuzzCAs     []*Authority
)

// fuzzAuthorities returns one P-256 and one P-384 root with fast signing on,
// made once: a root from 1990 for 110 years, so its own validity is encoded
// as UTCTime and GeneralizedTime.
func fuzzAuthorities(t testing.TB) []*Authority {
	fuzzCAsOnce.Do(func() {
		for _, kt := range []KeyType{KeyP256, KeyP384} {
			a, err := NewRoot(testTD, kt, 110*365*24*time.Hour, time.Date(1990, 1, 1, 0, 0, 0, 0, time.UTC))
			if err != nil {
				panic(err)
			}
			if err := a.EnableFastSign(FastSignOptions{}); err != nil {
				panic(err)
			}
			fuzzCAs = append(fuzzCAs, a)
		}
	})
	return fuzzCAs
}

// FuzzFastSignEqualsStdlib holds the fast path to x509.CreateCertificate:
// for any SVID that SignX509SVID would accept, both sign with a nil rand
// (deterministic ECDSA, RFC 6979), so the whole certificates must be
// byte-identical, and where CreateCertificate refuses the input the fast path
// must refuse it too. The seed corpus runs in every `go test`; run
// `go test -run '^$' -fuzz FuzzFastSignEqualsStdlib ./ca/` after a Go upgrade.
//
// Inputs: CA curve (even: P-256), subject key type (index into
// allKeyTypes), serial bytes, notBefore as Unix seconds, lifetime in
// seconds, the SPIFFE ID path, DNS names separated by commas, and how many
// times to repeat that list (for lengths that need two or three octets).
func FuzzFastSignEqualsStdlib(f *testing.F) {
	seeds := []struct {
		ca, kt   uint8
		serial   []byte
		nb, life int64
		path     string
		dns      string
		repeat   uint8
	}{
		{0, 0, []byte{0x7f, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).Unix(), 86400, "/ns/default/sa/web", "", 1},
		{1, 1, []byte{0xff, 0xff}, time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).Unix(), 3600, "/a", "web.default.svc,*.web.default.svc.cluster.local,a", 1},
		// Crossing and after the 2050 UTCTime/GeneralizedTime switch.
		{0, 2, []byte{1}, time.Date(2049, 12, 31, 23, 59, 30, 0, time.UTC).Unix(), 3600, "/x/y", "a.b", 1},
		{1, 3, []byte{0x80}, time.Date(2050, 1, 1, 0, 0, 0, 0, time.UTC).Unix(), 3600, "/x", "", 1},
		{0, 4, []byte{0x01, 0x00}, time.Date(2052, 2, 29, 8, 0, 0, 0, time.UTC).Unix(), 90 * 86400, "/ns/a-b_c.d", "", 1},
		// Crossing 2000, and before 1950 (GeneralizedTime again).
		{1, 0, []byte{0x42}, time.Date(1999, 12, 31, 23, 30, 0, 0, time.UTC).Unix(), 3600, "/old", "", 1},
		{0, 0, []byte{0x42}, time.Date(1949, 12, 31, 23, 30, 0, 0, time.UTC).Unix(), 3600, "/older", "", 1},
		// 20-byte (160-bit) serial with the top bit set.
		{0, 1, bytes.Repeat([]byte{0xff}, 20), time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC).Unix(), 60, "/s", "", 1},
		// Long SAN lists: lengths in long form, two and three octets.
		{0, 0, []byte{9}, time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC).Unix(), 60, "/many", "a123456789.b123456789.c123456789.d123456789.example", 5},
		{1, 2, []byte{9}, time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC).Unix(), 60, "/many", strings.Repeat("l123456789", 6) + ".example.com,x.y", 250},
		// A long path (URI SAN in long form).
		{0, 0, []byte{3}, time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC).Unix(), 60, "/" + strings.Repeat("p", 200), "", 1},
	}
	for _, s := range seeds {
		f.Add(s.ca, s.kt, s.serial, s.nb, s.life, s.path, s.dns, s.repeat)
	}
	keys := testSubjectKeys(f)
	f.Fuzz(func(t *testing.T, caSel, ktSel uint8, serialBytes []byte, nbUnix, life int64, path, dnsList string, repeat uint8) {
		cas := fuzzAuthorities(t)
		a := cas[int(caSel)%len(cas)]
		c, err := a.prepare()
		if err != nil || c.fast == nil {
			t.Fatalf("fast path missing (err %v)", err)
		}
		pub := keys[allKeyTypes[int(ktSel)%len(allKeyTypes)]].Public()

		// What SignX509SVID would refuse before signing is out of scope.
		if len(serialBytes) == 0 || len(serialBytes) > 20 {
			t.Skip("serial outside 1..20 octets")
		}
		serial := new(big.Int).SetBytes(serialBytes)
		if serial.Sign() == 0 {
			t.Skip("zero serial")
		}
		id, err := spiffeid.FromPath(testTD, path)
		if err != nil || path == "" || CheckSPIFFEID(id.String()) != nil {
			t.Skip("not a leaf SPIFFE ID")
		}
		var dns []string
		if dnsList != "" {
			for _, name := range strings.Split(dnsList, ",") {
				if CheckDNSName(name) != nil {
					t.Skip("bad DNS name")
				}
				dns = append(dns, name)
			}
		}
		if len(dnsList)*int(repeat) > 100_000 {
			t.Skip("SAN list too long to be worth signing")
		}
		base := dns
		for range int(repeat) - 1 {
			dns = append(dns, base...)
		}
		if life <= 0 || nbUnix < -62135596800 || nbUnix > 253402300799-life {
			t.Skip("validity outside years 1..9999")
		}
		nb := time.Unix(nbUnix, 0)
		na := nb.Add(time.Duration(life) * time.Second)

		in := svidInputs(t, pub, serial, nb, na, id, dns)
		want, wantErr := x509.CreateCertificate(nil, svidTemplate(c.leafSubject, serial, nb, na, in.skid, in.keyUsage, id, dns), a.Cert, pub, a.Key)
		got, gotErr := c.fast.sign(nil, in)
		if wantErr != nil {
			if gotErr == nil {
				t.Fatalf("CreateCertificate refused (%v) what the fast path signed", wantErr)
			}
			return
		}
		if gotErr != nil {
			t.Fatalf("fast path: %v (CreateCertificate signed it)", gotErr)
		}
		requireSameDER(t, "certificate", got, want)
		if err := checkFastSVID(got, a.Cert, id.String(), pub); err != nil {
			t.Fatal(err)
		}
	})
}
