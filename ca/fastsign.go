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
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"time"
)

// This file is the ECDSA fast path of SignX509SVID. It writes the
// TBSCertificate DER itself, byte-for-byte what x509.CreateCertificate emits
// for the template svidTemplate builds, and signs it without the
// re-verification CreateCertificate does after signing. On P-256 that check
// (one ECDSA verify, ~2x the cost of the sign) is more than half of what
// minting an SVID costs.
//
// The fast path is taken only when the CA key is an in-process
// *ecdsa.PrivateKey on P-256 or P-384:
//
//   - RSA keys keep CreateCertificate: an RSA-CRT signature computed under a
//     fault (bit flip, glitch) lets anyone holding it and the public key factor
//     the modulus, i.e. recover the CA key. Go's self-check is what stops such
//     a signature from ever leaving the process, so it must not be skipped.
//   - Ed25519 CA keys keep it too (they are not accepted for CAs anyway).
//   - Opaque signers (HSM/KMS) whose public key is ECDSA keep it: we cannot
//     vouch that they return a valid signature for the right key, and they
//     are network-bound, so the verify is not what limits them.
//
// Tests (fastsign_test.go) compare the TBSCertificate bytes against
// CreateCertificate's for every subject key type, both CA curves, with and
// without DNS names and across the UTCTime/GeneralizedTime switch in 2050.

// OIDs and fixed encodings, as crypto/x509 writes them.
var (
	oidExtKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtExtendedKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtSubjectKeyID     = asn1.ObjectIdentifier{2, 5, 29, 14}
	oidExtAuthorityKeyID   = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}

	oidSigECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidSigECDSAWithSHA384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}

	oidEKUServerAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidEKUClientAuth = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}

	// DER of the OBJECT IDENTIFIERs 2.5.29.14 and 2.5.29.17 (tag, length, body).
	derOIDSubjectKeyID   = []byte{0x06, 0x03, 0x55, 0x1d, 0x0e}
	derOIDSubjectAltName = []byte{0x06, 0x03, 0x55, 0x1d, 0x11}

	// [0] EXPLICIT INTEGER 2: certificate version v3.
	derVersionV3 = []byte{0xa0, 0x03, 0x02, 0x01, 0x02}

	// derEmptySubject is an empty Name, for which RFC 5280 (and Go) mark the
	// SAN extension critical.
	derEmptySubject = []byte{0x30, 0x00}

	// SubjectPublicKeyInfo up to and including the BIT STRING's unused-bits
	// octet; the key bytes follow. Same as x509.MarshalPKIXPublicKey.
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

// certHeadroom is room left in front of the TBSCertificate for the outer
// Certificate SEQUENCE header (tag + up to 5 length octets), so the signed
// certificate is assembled in one buffer without moving the TBS.
const certHeadroom = 6

// ecFastPath holds everything about an SVID TBSCertificate that does not
// change between SVIDs of one Authority. It is part of signCache.
type ecFastPath struct {
	key    *ecdsa.PrivateKey // the only key this cache entry may sign with
	hash   crypto.Hash       // SHA-256 for P-256, SHA-384 for P-384
	sigAlg []byte            // DER AlgorithmIdentifier, in the TBS and after it

	issuer  []byte // the CA's subject DER (RawSubject)
	subject []byte // the SVID subject DER (O=meshid)

	kuExt     []byte // keyUsage extension: digitalSignature
	kuExtRSA  []byte // keyUsage extension: digitalSignature|keyEncipherment
	ekuExt    []byte // extKeyUsage extension: serverAuth, clientAuth
	bcExt     []byte // basicConstraints extension: critical, CA:FALSE
	akidExt   []byte // authorityKeyIdentifier extension; nil when Go omits it
	sanCrit   bool   // SAN critical: only when subject is empty
	fixedExts int    // len(kuExt or kuExtRSA, same size) + eku + bc + akid
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
	// What signingParamsForKey picks for the key when the template does not
	// set SignatureAlgorithm.
	var f ecFastPath
	var sigOID asn1.ObjectIdentifier
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
	if cert.PublicKey != nil && !k.PublicKey.Equal(cert.PublicKey) {
		return nil
	}
	var err error
	f.key = k
	if f.sigAlg, err = asn1.Marshal(pkix.AlgorithmIdentifier{Algorithm: sigOID}); err != nil {
		return nil
	}
	// subjectBytes(parent): RawSubject, else the marshaled Subject.
	f.issuer = cert.RawSubject
	if len(f.issuer) == 0 {
		if f.issuer, err = asn1.Marshal(cert.Subject.ToRDNSequence()); err != nil {
			return nil
		}
	}
	f.subject = leafSubject
	if f.kuExt, err = keyUsageExtension(x509.KeyUsageDigitalSignature); err != nil {
		return nil
	}
	if f.kuExtRSA, err = keyUsageExtension(x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment); err != nil {
		return nil
	}
	if len(f.kuExt) != len(f.kuExtRSA) {
		return nil // cannot happen: both are one-octet BIT STRINGs
	}
	ekuVal, err := asn1.Marshal([]asn1.ObjectIdentifier{oidEKUServerAuth, oidEKUClientAuth})
	if err != nil {
		return nil
	}
	if f.ekuExt, err = asn1.Marshal(pkix.Extension{Id: oidExtExtendedKeyUsage, Value: ekuVal}); err != nil {
		return nil
	}
	// basicConstraints{IsCA: false, MaxPathLen: -1}: both fields are at their
	// DEFAULT and omitted, leaving an empty SEQUENCE.
	if f.bcExt, err = asn1.Marshal(pkix.Extension{Id: oidExtBasicConstraints, Critical: true, Value: []byte{0x30, 0x00}}); err != nil {
		return nil
	}
	// CreateCertificate takes the AKID from the parent's SKID unless issuer
	// and subject are equal (then it would use the template's, which is
	// empty).
	if !bytes.Equal(f.issuer, f.subject) && len(cert.SubjectKeyId) > 0 {
		akidVal, err := asn1.Marshal(struct {
			ID []byte `asn1:"optional,tag:0"`
		}{cert.SubjectKeyId})
		if err != nil {
			return nil
		}
		if f.akidExt, err = asn1.Marshal(pkix.Extension{Id: oidExtAuthorityKeyID, Value: akidVal}); err != nil {
			return nil
		}
	}
	f.sanCrit = bytes.Equal(f.subject, derEmptySubject)
	f.fixedExts = len(f.kuExt) + len(f.ekuExt) + len(f.bcExt) + len(f.akidExt)
	return &f
}

// keyUsageExtension is crypto/x509's marshalKeyUsage: a critical extension
// holding the usage bits as a BIT STRING with trailing zero bits trimmed.
func keyUsageExtension(ku x509.KeyUsage) ([]byte, error) {
	a := [2]byte{reverseBits(byte(ku)), reverseBits(byte(ku >> 8))}
	bits := a[:1]
	if a[1] != 0 {
		bits = a[:2]
	}
	bitLen := len(bits) * 8
	for i := len(bits) - 1; i >= 0 && bitLen > 0; i-- {
		b := bits[i]
		if b != 0 {
			for b&1 == 0 {
				bitLen--
				b >>= 1
			}
			break
		}
		bitLen -= 8
	}
	val, err := asn1.Marshal(asn1.BitString{Bytes: bits, BitLength: bitLen})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(pkix.Extension{Id: oidExtKeyUsage, Critical: true, Value: val})
}

func reverseBits(b byte) byte {
	var r byte
	for i := 0; i < 8; i++ {
		r = r<<1 | b&1
		b >>= 1
	}
	return r
}

// usable reports whether this fast path may sign for an Authority whose key
// is key. The cache is keyed by certificate and chain, not by key, so a key
// swapped in on its own must not be signed for with the old state.
func (f *ecFastPath) usable(key crypto.Signer) bool {
	if f == nil {
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
	buf, err := f.appendTBS(in)
	if err != nil {
		return nil, err
	}
	tbs := buf[certHeadroom:]
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
	// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
	// signatureValue BIT STRING } -- the signature has no unused bits.
	buf = append(buf, f.sigAlg...)
	buf = append(buf, 0x03)
	buf = appendDERLength(buf, 1+len(sig))
	buf = append(buf, 0x00)
	buf = append(buf, sig...)

	var hdr [certHeadroom + 4]byte
	h := appendDERLength(append(hdr[:0], 0x30), len(buf)-certHeadroom)
	if len(h) > certHeadroom {
		return nil, errors.New("certificate too large")
	}
	start := certHeadroom - len(h)
	copy(buf[start:], h)
	return buf[start:len(buf):len(buf)], nil
}

// tbsCertificate returns just the TBSCertificate DER; it is the hook the
// byte-equality tests use.
func (f *ecFastPath) tbsCertificate(in *svidFields) ([]byte, error) {
	buf, err := f.appendTBS(in)
	if err != nil {
		return nil, err
	}
	return buf[certHeadroom:], nil
}

// appendTBS returns a buffer of certHeadroom unused bytes followed by the
// TBSCertificate, with capacity for the rest of the certificate. It sizes
// everything first so the buffer is allocated once.
func (f *ecFastPath) appendTBS(in *svidFields) ([]byte, error) {
	if in.serial == nil || in.serial.Sign() < 0 {
		return nil, errors.New("serial number must be positive")
	}
	spki, err := marshalSPKI(in.pub)
	if err != nil {
		return nil, err
	}
	nb, na := in.notBefore.UTC(), in.notAfter.UTC()
	nbLen, err := derTimeLen(nb)
	if err != nil {
		return nil, err
	}
	naLen, err := derTimeLen(na)
	if err != nil {
		return nil, err
	}
	kuExt := f.kuExt
	switch in.keyUsage {
	case x509.KeyUsageDigitalSignature:
	case x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment:
		kuExt = f.kuExtRSA
	default:
		return nil, fmt.Errorf("unexpected key usage %#x", in.keyUsage)
	}
	if len(in.skid) == 0 {
		return nil, errors.New("empty subject key ID")
	}

	// Sizes, innermost first.
	serialLen := derIntegerLen(in.serial)
	validityLen := derTLVLen(derTLVLen(nbLen) + derTLVLen(naLen))
	skidExtLen := derTLVLen(len(derOIDSubjectKeyID) + derTLVLen(derTLVLen(len(in.skid))))
	sanSeq := derTLVLen(len(in.uri))
	for _, name := range in.dnsNames {
		sanSeq += derTLVLen(len(name))
	}
	sanExtContent := len(derOIDSubjectAltName) + derTLVLen(derTLVLen(sanSeq))
	if f.sanCrit {
		sanExtContent += 3
	}
	extsSeq := f.fixedExts + skidExtLen + derTLVLen(sanExtContent)
	tbsContent := len(derVersionV3) + derTLVLen(serialLen) + len(f.sigAlg) + len(f.issuer) +
		validityLen + len(f.subject) + len(spki) + derTLVLen(derTLVLen(extsSeq))
	tbsLen := derTLVLen(tbsContent)

	// Room after the TBS for the algorithm, the BIT STRING header and an
	// ECDSA signature (at most 2*(2+1+66)+3 octets, for P-521 even).
	b := make([]byte, certHeadroom, certHeadroom+tbsLen+len(f.sigAlg)+4+144)
	b = append(b, 0x30)
	b = appendDERLength(b, tbsContent)
	b = append(b, derVersionV3...)
	b = append(b, 0x02)
	b = appendDERLength(b, serialLen)
	b = appendDERInteger(b, in.serial, serialLen)
	b = append(b, f.sigAlg...)
	b = append(b, f.issuer...)
	b = append(b, 0x30)
	b = appendDERLength(b, derTLVLen(nbLen)+derTLVLen(naLen))
	b = appendDERTime(b, nb)
	b = appendDERTime(b, na)
	b = append(b, f.subject...)
	b = append(b, spki...)

	// extensions [3] EXPLICIT SEQUENCE OF Extension, in crypto/x509's
	// order: keyUsage, extKeyUsage, basicConstraints, SKID, AKID, SAN.
	b = append(b, 0xa3)
	b = appendDERLength(b, derTLVLen(extsSeq))
	b = append(b, 0x30)
	b = appendDERLength(b, extsSeq)
	b = append(b, kuExt...)
	b = append(b, f.ekuExt...)
	b = append(b, f.bcExt...)

	b = append(b, 0x30) // SKID: OCTET STRING wrapping OCTET STRING(skid)
	b = appendDERLength(b, len(derOIDSubjectKeyID)+derTLVLen(derTLVLen(len(in.skid))))
	b = append(b, derOIDSubjectKeyID...)
	b = append(b, 0x04)
	b = appendDERLength(b, derTLVLen(len(in.skid)))
	b = append(b, 0x04)
	b = appendDERLength(b, len(in.skid))
	b = append(b, in.skid...)

	b = append(b, f.akidExt...)

	b = append(b, 0x30) // SAN: dNSName [2] entries, then the URI [6]
	b = appendDERLength(b, sanExtContent)
	b = append(b, derOIDSubjectAltName...)
	if f.sanCrit {
		b = append(b, 0x01, 0x01, 0xff)
	}
	b = append(b, 0x04)
	b = appendDERLength(b, derTLVLen(sanSeq))
	b = append(b, 0x30)
	b = appendDERLength(b, sanSeq)
	for _, name := range in.dnsNames {
		b = append(b, 0x82)
		b = appendDERLength(b, len(name))
		b = append(b, name...)
	}
	b = append(b, 0x86)
	b = appendDERLength(b, len(in.uri))
	b = append(b, in.uri...)

	if len(b) != certHeadroom+tbsLen {
		// A sizing bug; never sign something we did not mean to write.
		return nil, fmt.Errorf("internal error: TBSCertificate is %d bytes, sized %d", len(b)-certHeadroom, tbsLen)
	}
	return b, nil
}

// marshalSPKI is x509.MarshalPKIXPublicKey, without the reflection-based
// encoder for the key types that have a fixed layout.
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
	if want := int(prefix[len(prefix)-2]) - 1; len(key) != want {
		return nil, fmt.Errorf("public key is %d bytes, want %d", len(key), want)
	}
	out := make([]byte, 0, len(prefix)+len(key))
	return append(append(out, prefix...), key...), nil
}

// derLengthLen is how many octets appendDERLength writes for n.
func derLengthLen(n int) int {
	if n < 0x80 {
		return 1
	}
	l := 1
	for ; n > 0; n >>= 8 {
		l++
	}
	return l
}

// derTLVLen is the size of a tag-length-value with a one-octet tag and n
// content octets.
func derTLVLen(n int) int { return 1 + derLengthLen(n) + n }

func appendDERLength(b []byte, n int) []byte {
	if n < 0x80 {
		return append(b, byte(n))
	}
	l := derLengthLen(n) - 1
	b = append(b, 0x80|byte(l))
	for i := l - 1; i >= 0; i-- {
		b = append(b, byte(n>>(8*i)))
	}
	return b
}

// derIntegerLen is the content length of a non-negative INTEGER: minimal
// big-endian two's complement, so a leading 0x00 when the top bit is set.
func derIntegerLen(n *big.Int) int {
	bl := n.BitLen()
	if bl == 0 {
		return 1
	}
	return bl/8 + 1 // (bl+7)/8 octets, plus one when bl%8 == 0
}

func appendDERInteger(b []byte, n *big.Int, l int) []byte {
	start := len(b)
	b = append(b, make([]byte, l)...) // zeroes; appended in place, no alloc
	n.FillBytes(b[start:])
	return b
}

// derTimeLen is the content length encoding/asn1 uses for t (already UTC):
// UTCTime YYMMDDHHMMSSZ for 1950..2049, GeneralizedTime YYYYMMDDHHMMSSZ
// otherwise.
func derTimeLen(t time.Time) (int, error) {
	switch y := t.Year(); {
	case 1950 <= y && y < 2050:
		return 13, nil
	case 0 <= y && y <= 9999:
		return 15, nil
	default:
		return 0, fmt.Errorf("cannot encode year %d", y)
	}
}

func appendDERTime(b []byte, t time.Time) []byte {
	y := t.Year()
	if 1950 <= y && y < 2050 {
		b = append(b, 0x17, 13) // UTCTime
		b = append2(b, y%100)
	} else {
		b = append(b, 0x18, 15) // GeneralizedTime
		b = append2(append2(b, y/100), y%100)
	}
	_, mo, d := t.Date()
	h, mi, s := t.Clock()
	b = append2(b, int(mo))
	b = append2(b, d)
	b = append2(b, h)
	b = append2(b, mi)
	b = append2(b, s)
	return append(b, 'Z')
}

func append2(b []byte, v int) []byte {
	return append(b, byte('0'+v/10), byte('0'+v%10))
}
