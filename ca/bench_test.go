package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
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
// BenchmarkCryptoFloor is the bare crypto a mint cannot avoid: a P-256 key,
// one ECDSA signature (over a real SVID's TBSCertificate) by the P-256 CA
// key, and the PEM of the certificate and of the PKCS#8 key. BenchmarkMint
// (x509.CreateCertificate, the default) and BenchmarkMintFastSign
// (EnableFastSign) do the same work through Authority.MintX509SVID; the goal
// is mint >= 85% of the floor's rate. BenchmarkCreateCertificate is the same
// work as direct library calls, with a template built once, to show what is
// the library's (its post-sign verify) and what is meshid's (validation,
// SKID hash, chain copy).
//
// The CSR variants add what a CSR-based mint (agent, svidcache) does on top:
// the requester's CSR signature and the CA's check of it.

func benchAuthority(b *testing.B) *Authority {
	b.Helper()
	a, err := NewRoot(testTD, KeyP256, 365*24*time.Hour, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	return a
}

func benchFastAuthority(b *testing.B) *Authority {
	b.Helper()
	a := benchAuthority(b)
	if err := a.EnableFastSign(FastSignOptions{}); err != nil {
		b.Fatal(err)
	}
	return a
}

// benchTBS is a real SVID's TBSCertificate, for the floor's signature.
func benchTBS(b *testing.B, a *Authority) []byte {
	b.Helper()
	s, err := a.MintX509SVID(testID, KeyP256, nil, 24*time.Hour, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(s.CertDER)
	if err != nil {
		b.Fatal(err)
	}
	return leaf.RawTBSCertificate
}

// floorSign is the floor's certificate: one ECDSA signature over tbs, and
// tbs and signature concatenated (the ASN.1 wrapping is a few bytes).
func floorSign(caKey *ecdsa.PrivateKey, tbs []byte) ([]byte, error) {
	d := sha256.Sum256(tbs)
	sig, err := ecdsa.SignASN1(rand.Reader, caKey, d[:])
	if err != nil {
		return nil, err
	}
	return append(append(make([]byte, 0, len(tbs)+len(sig)+16), tbs...), sig...), nil
}

func BenchmarkCryptoFloor(b *testing.B) {
	a := benchAuthority(b)
	tbs := benchTBS(b, a)
	caKey := a.Key.(*ecdsa.PrivateKey)
	b.ReportAllocs()
	b.ResetTimer()
	defer cpuPerOp(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				b.Error(err)
				return
			}
			der, err := floorSign(caKey, tbs)
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

func BenchmarkCreateCertificate(b *testing.B) {
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
	defer cpuPerOp(b)()
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

func BenchmarkMint(b *testing.B)         { benchMint(b, benchAuthority(b)) }
func BenchmarkMintFastSign(b *testing.B) { benchMint(b, benchFastAuthority(b)) }

func benchMint(b *testing.B, a *Authority) {
	b.ReportAllocs()
	b.ResetTimer()
	defer cpuPerOp(b)()
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

// BenchmarkCryptoFloorCSR is the bare crypto of a CSR mint: a P-256 key, its
// CSR signature, the CA's verify of it, the certificate signature, and the
// certificate's PEM (the key never leaves its maker, so it is not encoded).
func BenchmarkCryptoFloorCSR(b *testing.B) {
	a := benchAuthority(b)
	tbs := benchTBS(b, a)
	caKey := a.Key.(*ecdsa.PrivateKey)
	csrTBS := benchCSRTBS(b)
	b.ReportAllocs()
	b.ResetTimer()
	defer cpuPerOp(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				b.Error(err)
				return
			}
			d := sha256.Sum256(csrTBS)
			sig, err := ecdsa.SignASN1(rand.Reader, key, d[:])
			if err != nil {
				b.Error(err)
				return
			}
			if !ecdsa.VerifyASN1(&key.PublicKey, d[:], sig) {
				b.Error("CSR signature does not verify")
				return
			}
			der, err := floorSign(caKey, tbs)
			if err != nil {
				b.Error(err)
				return
			}
			if len(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})) == 0 {
				b.Error("empty PEM")
				return
			}
		}
	})
}

func benchCSRTBS(b *testing.B) []byte {
	b.Helper()
	key, err := GenerateKey(KeyP256)
	if err != nil {
		b.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		b.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		b.Fatal(err)
	}
	return csr.RawTBSCertificateRequest
}

// BenchmarkMintCSR is the whole CSR mint through the library calls meshid
// uses: key, x509.CreateCertificateRequest, ParseCSR, SignX509SVID, PEM.
func BenchmarkMintCSR(b *testing.B)         { benchMintCSR(b, benchAuthority(b)) }
func BenchmarkMintCSRFastSign(b *testing.B) { benchMintCSR(b, benchFastAuthority(b)) }

func benchMintCSR(b *testing.B, a *Authority) {
	b.ReportAllocs()
	b.ResetTimer()
	defer cpuPerOp(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				b.Error(err)
				return
			}
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
			if err != nil {
				b.Error(err)
				return
			}
			csr, err := ParseCSR(der)
			if err != nil {
				b.Error(err)
				return
			}
			s, err := a.SignX509SVID(SVIDRequest{ID: testID, PublicKey: csr.PublicKey, TTL: 24 * time.Hour, Now: time.Now()})
			if err != nil {
				b.Error(err)
				return
			}
			if len(s.ChainPEM()) == 0 {
				b.Error("empty PEM")
				return
			}
		}
	})
}

// BenchmarkSignCSR is the agent path: the key was made on the node, and the
// CSR was parsed once (see BenchmarkParseCSR), so this is signing alone.
func BenchmarkSignCSR(b *testing.B)         { benchSignCSR(b, benchAuthority(b)) }
func BenchmarkSignCSRFastSign(b *testing.B) { benchSignCSR(b, benchFastAuthority(b)) }

func benchSignCSR(b *testing.B, a *Authority) {
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
	defer cpuPerOp(b)()
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
	defer cpuPerOp(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := ParseCSR(csrPEM); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
