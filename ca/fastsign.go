package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	encasn1 "encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/crypto/cryptobyte/asn1"
)

// This file is the opt-in ECDSA fast path of SignX509SVID (see
// Authority.EnableFastSign; it is off unless the operator asks for it). It
// writes the TBSCertificate with a cryptobyte builder, byte-for-byte what
// x509.CreateCertificate emits for the template svidTemplate builds, and signs
// it without the re-verification CreateCertificate does after signing. On
// P-256 that check (one ECDSA verify, ~2x the cost of the sign) is more than
// half of what minting an SVID costs.
//
// Go added that check on purpose (golang/go#40458: signers return invalid
// signatures, signatures for the wrong key, ...), so skipping it is guarded:
//
//   - only an in-process *ecdsa.PrivateKey on P-256 or P-384 that matches the
//     CA certificate qualifies. RSA keys keep CreateCertificate: an RSA-CRT
//     signature computed under a fault lets anyone holding it factor the
//     modulus, and Go's self-check is what keeps such a signature in the
//     process. Opaque signers (HSM/KMS) keep it too: we cannot vouch for what
//     they return, and they are network-bound, so the verify does not limit
//     them;
//   - when the fast path is built for an Authority (at load, and again when
//     its certificate changes) a canary SVID is signed both ways: the
//     TBSCertificates must be byte-identical and the fast signature must
//     verify under the CA certificate, or the fast path stays off. This is
//     what catches a Go upgrade that changes CreateCertificate's encoding;
//   - one fast-path SVID in fastVerifyEvery (and the first) is parsed and
//     verified against the CA before it is returned. A failure discards it,
//     turns the fast path off for that Authority, reports the error and signs
//     the SVID with CreateCertificate instead;
//   - FuzzFastSignEqualsStdlib holds the TBS bytes to CreateCertificate's for
//     every subject key type, both CA curves, DNS name lists and times on
//     both sides of the 2050 UTCTime/GeneralizedTime switch.

// Object identifiers, as crypto/x509 writes them.
var (
	oidExtKeyUsage         = encasn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtExtendedKeyUsage = encasn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtBasicConstraints = encasn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtSubjectKeyID     = encasn1.ObjectIdentifier{2, 5, 29, 14}
	oidExtAuthorityKeyID   = encasn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtSubjectAltName   = encasn1.ObjectIdentifier{2, 5, 29, 17}

	oidSigECDSAWithSHA256 = encasn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidSigECDSAWithSHA384 = encasn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}

	oidEKUServerAuth = encasn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidEKUClientAuth = encasn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
)

// derEmptySubject is an empty Name, for which RFC 5280 (and Go) mark the SAN
// extension critical.
var derEmptySubject = []byte{0x30, 0x00}

// fastVerifyEvery is the sampling period of the post-sign check: the first
// fast-path signature of an Authority and every 64th after it are parsed and
// verified (about 1.5% more work on average).
const fastVerifyEvery = 64

// Context-specific constructed tags of the TBSCertificate.
var (
	tagVersion    = asn1.Tag(0).Constructed().ContextSpecific()
	tagExtensions = asn1.Tag(3).Constructed().ContextSpecific()
	tagSANDNS     = asn1.Tag(2).ContextSpecific()
	tagSANURI     = asn1.Tag(6).ContextSpecific()
)

// ecFastPath holds everything about an SVID TBSCertificate that does not
// change between SVIDs of one Authority. It is part of signCache.
type ecFastPath struct {
	key    *ecdsa.PrivateKey // the only key this cache entry may sign with
	hash   crypto.Hash       // SHA-256 for P-256, SHA-384 for P-384
	sigAlg []byte            // DER AlgorithmIdentifier, in the TBS and after it

	issuer  []byte // the CA's subject DER (RawSubject)
	subject []byte // the SVID subject DER (O=meshid)

	kuExt    []byte // keyUsage extension: digitalSignature
	kuExtRSA []byte // keyUsage extension: digitalSignature|keyEncipherment
	ekuExt   []byte // extKeyUsage extension: serverAuth, clientAuth
	bcExt    []byte // basicConstraints extension: critical, CA:FALSE
	akidExt  []byte // authorityKeyIdentifier extension; nil when Go omits it
	sanCrit  bool   // SAN critical: only when subject is empty

	signed atomic.Uint64 // fast-path signatures so far, for sampling
	off    atomic.Bool   // set when a sampled check failed
}

// newECFastPath returns the fast-path state for signing under cert with key,
// or nil (and the caller uses CreateCertificate) when the fast path does not
// apply or anything about the CA is unusual enough that CreateCertificate
// should be the one to judge it.
func newECFastPath(cert *x509.Certificate, key crypto.Signer, leafSubject []byte) *ecFastPath {
	k, ok := key.(*ecdsa.PrivateKey)
	if !ok || k == nil {
		return nil
	}
	// What x509 picks for the key when the template does not set
	// SignatureAlgorithm.
	f := &ecFastPath{key: k, subject: leafSubject}
	var sigOID encasn1.ObjectIdentifier
	switch k.Curve {
	case elliptic.P256():
		f.hash, sigOID = crypto.SHA256, oidSigECDSAWithSHA256
	case elliptic.P384():
		f.hash, sigOID = crypto.SHA384, oidSigECDSAWithSHA384
	default:
		return nil
	}
	// CreateCertificate refuses a key that does not match the parent; leave
	// that error to it.
	if cert.PublicKey == nil || !k.PublicKey.Equal(cert.PublicKey) {
		return nil
	}
	// ECDSA AlgorithmIdentifiers have no parameters (RFC 5758 3.2).
	f.sigAlg = build(func(b *cryptobyte.Builder) {
		b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(sigOID) })
	})
	f.issuer = cert.RawSubject
	if len(f.issuer) == 0 {
		return nil
	}
	f.kuExt = extension(oidExtKeyUsage, true, keyUsageValue(x509.KeyUsageDigitalSignature))
	f.kuExtRSA = extension(oidExtKeyUsage, true, keyUsageValue(x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment))
	f.ekuExt = extension(oidExtExtendedKeyUsage, false, build(func(b *cryptobyte.Builder) {
		b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
			b.AddASN1ObjectIdentifier(oidEKUServerAuth)
			b.AddASN1ObjectIdentifier(oidEKUClientAuth)
		})
	}))
	// basicConstraints{cA: FALSE}: both fields are at their DEFAULT and
	// omitted, leaving an empty SEQUENCE.
	f.bcExt = extension(oidExtBasicConstraints, true, []byte{0x30, 0x00})
	// CreateCertificate takes the AKID from the parent's SKID unless issuer
	// and subject are equal (then it would use the template's, which is
	// empty).
	if !bytes.Equal(f.issuer, f.subject) && len(cert.SubjectKeyId) > 0 {
		f.akidExt = extension(oidExtAuthorityKeyID, false, build(func(b *cryptobyte.Builder) {
			b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
				b.AddASN1(asn1.Tag(0).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(cert.SubjectKeyId) })
			})
		}))
	}
	f.sanCrit = bytes.Equal(f.subject, derEmptySubject)
	for _, p := range [][]byte{f.sigAlg, f.kuExt, f.kuExtRSA, f.ekuExt, f.bcExt} {
		if p == nil {
			return nil // a builder error; cannot happen for these constants
		}
	}
	return f
}

// build runs f on a fresh builder and returns the bytes, or nil on error.
func build(f cryptobyte.BuilderContinuation) []byte {
	var b cryptobyte.Builder
	f(&b)
	out, err := b.Bytes()
	if err != nil {
		return nil
	}
	return out
}

// extension is one Extension SEQUENCE; like encoding/asn1, it omits critical
// when false (it is DEFAULT FALSE).
func extension(oid encasn1.ObjectIdentifier, critical bool, value []byte) []byte {
	if value == nil {
		return nil
	}
	return build(func(b *cryptobyte.Builder) {
		b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
			b.AddASN1ObjectIdentifier(oid)
			if critical {
				b.AddASN1Boolean(true)
			}
			b.AddASN1OctetString(value)
		})
	})
}

// keyUsageValue is crypto/x509's keyUsage encoding: the usage bits as a BIT
// STRING, bit 0 first, with trailing zero bits trimmed.
func keyUsageValue(ku x509.KeyUsage) []byte {
	a := [2]byte{reverseBits(byte(ku)), reverseBits(byte(ku >> 8))}
	bits := a[:1]
	if a[1] != 0 {
		bits = a[:2]
	}
	unused := 0
	if last := bits[len(bits)-1]; last != 0 {
		for last&1 == 0 {
			unused++
			last >>= 1
		}
	}
	return build(func(b *cryptobyte.Builder) {
		b.AddASN1(asn1.BIT_STRING, func(b *cryptobyte.Builder) {
			b.AddUint8(uint8(unused))
			b.AddBytes(bits)
		})
	})
}

func reverseBits(b byte) byte {
	var r byte
	for range 8 {
		r = r<<1 | b&1
		b >>= 1
	}
	return r
}

// usable reports whether this fast path may sign for an Authority whose key
// is key. The cache is keyed by certificate and chain, not by key, so a key
// swapped in on its own must not be signed for with the old state.
func (f *ecFastPath) usable(key crypto.Signer) bool {
	if f == nil || f.off.Load() {
		return false
	}
	k, ok := key.(*ecdsa.PrivateKey)
	return ok && k == f.key
}

// svidFields are the per-SVID inputs of the TBSCertificate; everything else
// comes from the ecFastPath.
type svidFields struct {
	serial    *big.Int
	notBefore time.Time
	notAfter  time.Time
	pub       crypto.PublicKey
	skid      []byte
	keyUsage  x509.KeyUsage
	uri       string // the SPIFFE ID, as url.URL.String() writes it
	dnsNames  []string
}

// sign builds and signs the certificate and returns its DER.
func (f *ecFastPath) sign(rand io.Reader, in *svidFields) ([]byte, error) {
	tbs, err := f.tbsCertificate(in)
	if err != nil {
		return nil, err
	}
	var sig []byte
	switch f.hash {
	case crypto.SHA256:
		d := sha256.Sum256(tbs)
		sig, err = f.key.Sign(rand, d[:], f.hash)
	case crypto.SHA384:
		d := sha512.Sum384(tbs)
		sig, err = f.key.Sign(rand, d[:], f.hash)
	default:
		err = fmt.Errorf("unexpected hash %v", f.hash)
	}
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	b := cryptobyte.NewBuilder(make([]byte, 0, len(tbs)+len(f.sigAlg)+160))
	b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddBytes(f.sigAlg)
		b.AddASN1BitString(sig)
	})
	der, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode certificate: %w", err)
	}
	return der, nil
}

// tbsCertificate returns the TBSCertificate DER, in crypto/x509's field and
// extension order.
func (f *ecFastPath) tbsCertificate(in *svidFields) ([]byte, error) {
	if in.serial == nil || in.serial.Sign() < 0 {
		return nil, errors.New("serial number must be positive")
	}
	if len(in.skid) == 0 {
		return nil, errors.New("empty subject key ID")
	}
	kuExt := f.kuExt
	switch in.keyUsage {
	case x509.KeyUsageDigitalSignature:
	case x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment:
		kuExt = f.kuExtRSA
	default:
		return nil, fmt.Errorf("unexpected key usage %#x", in.keyUsage)
	}
	spki, err := marshalSPKI(in.pub)
	if err != nil {
		return nil, err
	}
	b := cryptobyte.NewBuilder(make([]byte, 0, 512+len(spki)+len(in.uri)+dnsLen(in.dnsNames)))
	b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(tagVersion, func(b *cryptobyte.Builder) { b.AddASN1Int64(2) }) // v3
		b.AddASN1BigInt(in.serial)
		b.AddBytes(f.sigAlg)
		b.AddBytes(f.issuer)
		b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, in.notBefore)
			addTime(b, in.notAfter)
		})
		b.AddBytes(f.subject)
		b.AddBytes(spki)
		b.AddASN1(tagExtensions, func(b *cryptobyte.Builder) {
			b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
				// crypto/x509's order: keyUsage, extKeyUsage,
				// basicConstraints, SKID, AKID, SAN.
				b.AddBytes(kuExt)
				b.AddBytes(f.ekuExt)
				b.AddBytes(f.bcExt)
				b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
					b.AddASN1ObjectIdentifier(oidExtSubjectKeyID)
					b.AddASN1(asn1.OCTET_STRING, func(b *cryptobyte.Builder) { b.AddASN1OctetString(in.skid) })
				})
				b.AddBytes(f.akidExt)
				b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
					b.AddASN1ObjectIdentifier(oidExtSubjectAltName)
					if f.sanCrit {
						b.AddASN1Boolean(true)
					}
					b.AddASN1(asn1.OCTET_STRING, func(b *cryptobyte.Builder) {
						b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
							for _, name := range in.dnsNames {
								b.AddASN1(tagSANDNS, func(b *cryptobyte.Builder) { b.AddBytes([]byte(name)) })
							}
							b.AddASN1(tagSANURI, func(b *cryptobyte.Builder) { b.AddBytes([]byte(in.uri)) })
						})
					})
				})
			})
		})
	})
	tbs, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode TBSCertificate: %w", err)
	}
	return tbs, nil
}

// SubjectPublicKeyInfo up to and including the BIT STRING's unused-bits
// octet, for the key types with a fixed layout; the key bytes follow. The
// same as x509.MarshalPKIXPublicKey writes (TestMarshalSPKI), without its
// reflection-based encoder, which costs as much as the rest of the TBS.
var (
	spkiPrefixP256 = []byte{ // id-ecPublicKey, prime256v1, 65-byte point
		0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
		0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
	}
	spkiPrefixP384 = []byte{ // id-ecPublicKey, secp384r1, 97-byte point
		0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
		0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
	}
	spkiPrefixEd25519 = []byte{ // id-Ed25519, no parameters, 32-byte key
		0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
	}
)

// marshalSPKI is x509.MarshalPKIXPublicKey, with the fixed layouts above
// for P-256, P-384 and Ed25519 keys.
func marshalSPKI(pub crypto.PublicKey) ([]byte, error) {
	var prefix, key []byte
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			prefix = spkiPrefixP256
		case elliptic.P384():
			prefix = spkiPrefixP384
		}
		if prefix != nil {
			b, err := k.Bytes()
			if err != nil {
				return nil, fmt.Errorf("encode ECDSA public key: %w", err)
			}
			key = b
		}
	case ed25519.PublicKey:
		if len(k) == ed25519.PublicKeySize {
			prefix, key = spkiPrefixEd25519, k
		}
	}
	if prefix == nil {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, fmt.Errorf("marshal public key: %w", err)
		}
		return der, nil
	}
	// The prefix ends with the BIT STRING's length (unused-bits octet
	// included) and the unused-bits octet.
	if want := int(prefix[len(prefix)-2]) - 1; len(key) != want {
		return nil, fmt.Errorf("public key is %d bytes, want %d", len(key), want)
	}
	return append(append(make([]byte, 0, len(prefix)+len(key)), prefix...), key...), nil
}

func dnsLen(names []string) int {
	n := 0
	for _, s := range names {
		n += len(s) + 4
	}
	return n
}

// addTime writes t the way encoding/asn1 does for crypto/x509: in UTC, as
// UTCTime for 1950..2049 and GeneralizedTime otherwise.
func addTime(b *cryptobyte.Builder, t time.Time) {
	t = t.UTC()
	if y := t.Year(); 1950 <= y && y < 2050 {
		b.AddASN1UTCTime(t)
	} else {
		b.AddASN1GeneralizedTime(t)
	}
}

// errFastSignCheck marks a failed canary or sampled post-sign check.
var errFastSignCheck = errors.New("fast-path signature check failed")

// checkFastSVID is the post-sign check: der must parse, carry exactly the
// requested URI and public key, and verify under the CA certificate.
func checkFastSVID(der []byte, caCert *x509.Certificate, uri string, pub crypto.PublicKey) error {
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("%w: parse: %w", errFastSignCheck, err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != uri {
		return fmt.Errorf("%w: URI SANs %v, want %s", errFastSignCheck, leaf.URIs, uri)
	}
	if p, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !p.Equal(leaf.PublicKey) {
		return fmt.Errorf("%w: subject public key differs from the request's", errFastSignCheck)
	}
	if err := leaf.CheckSignatureFrom(caCert); err != nil {
		return fmt.Errorf("%w: signature: %w", errFastSignCheck, err)
	}
	return nil
}
