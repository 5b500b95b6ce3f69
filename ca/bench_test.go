package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/url"
	"testing"
	"time"
)

// The benchmarks use b.RunParallel throughout so that `-cpu 2` measures
// throughput on both cores; at -cpu 1 they run serially.
//
// BenchmarkCryptoFloor and BenchmarkMint do the same work per operation, so
// their ratio is our overhead over the bare library calls:
//
//	P-256 keygen + x509.CreateCertificate (P-256 CA) + PEM of the certificate
//	+ PKCS#8 marshal and PEM of the private key.
//
// The floor's template is built once (only the serial changes per iteration),
// including an SKID of the same size as a real one, so that it encodes the
// same extensions Mint does without paying for the per-key SKID hash, the
// request validation or the chain copy; those are exactly the overhead we
// want to see.

func benchAuthority(b *testing.B) *Authority {
	b.Helper()
	a, err := NewRoot(testTD, KeyP256, 365*24*time.Hour, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	return a
}

func BenchmarkCryptoFloor(b *testing.B) {
	a := benchAuthority(b)
	skid := make([]byte, 20)
	base := x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"meshid"}},
		NotBefore:             time.Now().Add(-10 * time.Second),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		SubjectKeyId:          skid,
		URIs:                  []*url.URL{testID.URL()},
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		tmpl := base // per goroutine: only SerialNumber is written
		for pb.Next() {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				b.Error(err)
				return
			}
			serial, err := newSerial()
			if err != nil {
				b.Error(err)
				return
			}
			tmpl.SerialNumber = serial
			der, err := x509.CreateCertificate(rand.Reader, &tmpl, a.Cert, &key.PublicKey, a.Key)
			if err != nil {
				b.Error(err)
				return
			}
			certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
			keyDER, err := x509.MarshalPKCS8PrivateKey(key)
			if err != nil {
				b.Error(err)
				return
			}
			keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
			if len(certPEM) == 0 || len(keyPEM) == 0 {
				b.Error("empty PEM")
				return
			}
		}
	})
}

func BenchmarkMint(b *testing.B) {
	a := benchAuthority(b)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s, err := a.MintX509SVID(testID, KeyP256, nil, 24*time.Hour, time.Now())
			if err != nil {
				b.Error(err)
				return
			}
			certPEM := s.ChainPEM()
			keyPEM, err := EncodeKeyPEM(s.Key)
			if err != nil {
				b.Error(err)
				return
			}
			if len(certPEM) == 0 || len(keyPEM) == 0 {
				b.Error("empty PEM")
				return
			}
		}
	})
}

// BenchmarkSignCSR is the agent path: the key was made on the node, and the
// CSR was parsed once (see BenchmarkParseCSR), so this is signing alone.
func BenchmarkSignCSR(b *testing.B) {
	a := benchAuthority(b)
	key, err := GenerateKey(KeyP256)
	if err != nil {
		b.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		b.Fatal(err)
	}
	csr, err := ParseCSR(csrDER)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: csr.PublicKey, TTL: 24 * time.Hour, Now: time.Now()}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkParseCSR is dominated by the signature check, which is what makes
// a CSR proof of possession.
func BenchmarkParseCSR(b *testing.B) {
	key, err := GenerateKey(KeyP256)
	if err != nil {
		b.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		b.Fatal(err)
	}
	csrPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := ParseCSR(csrPEM); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
