package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultJWTTTL is the life of a JWT-SVID: short, because a bearer token
// cannot be revoked once it has left.
const DefaultJWTTTL = 5 * time.Minute

// ErrInvalidJWTRequest covers a JWT-SVID request the caller must fix.
var ErrInvalidJWTRequest = errors.New("invalid JWT-SVID request")

// JWTAuthority signs JWT-SVIDs for a trust domain with one ES256 key.
type JWTAuthority struct {
	TrustDomain spiffeid.TrustDomain
	Key         crypto.Signer
	KeyID       string
	NotAfter    time.Time
	signer      jose.Signer
}

// NewJWTAuthority makes a fresh ES256 (P-256) signing key valid for ttl.
func NewJWTAuthority(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (*JWTAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate JWT key: %w", err)
	}
	return LoadJWTAuthority(td, key, now.Add(ttl))
}

// LoadJWTAuthority wraps an existing key.
func LoadJWTAuthority(td spiffeid.TrustDomain, key crypto.Signer, notAfter time.Time) (*JWTAuthority, error) {
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("JWT key must be ECDSA P-256 (ES256): %w", ErrUnsupportedKey)
	}
	kid, err := JWTKeyID(key.Public())
	if err != nil {
		return nil, err
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: ec, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("JWT signer: %w", err)
	}
	return &JWTAuthority{TrustDomain: td, Key: key, KeyID: kid, NotAfter: notAfter, signer: signer}, nil
}

// JWTKeyID derives a key's kid from its public key, so the same key always
// has the same kid across restarts and replicas.
func JWTKeyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("marshal JWT public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:16]), nil
}

// MintJWTSVID signs a JWT-SVID per the SPIFFE JWT-SVID standard: sub is
// the SPIFFE ID, aud is required, exp is short (never beyond the key).
func (j *JWTAuthority) MintJWTSVID(id spiffeid.ID, audience []string, ttl time.Duration, now time.Time) (string, time.Time, error) {
	if id.IsZero() || id.TrustDomain() != j.TrustDomain {
		return "", time.Time{}, fmt.Errorf("%w: %s is not in trust domain %s", ErrForeignID, id, j.TrustDomain)
	}
	if len(audience) == 0 {
		return "", time.Time{}, fmt.Errorf("%w: at least one audience is required", ErrInvalidJWTRequest)
	}
	for _, a := range audience {
		if a == "" {
			return "", time.Time{}, fmt.Errorf("%w: empty audience", ErrInvalidJWTRequest)
		}
	}
	if ttl <= 0 {
		ttl = DefaultJWTTTL
	}
	exp := now.Add(ttl).Truncate(time.Second)
	if exp.After(j.NotAfter) {
		exp = j.NotAfter
	}
	if !exp.After(now) {
		return "", time.Time{}, errors.New("the JWT signing key has expired")
	}
	claims := jwt.Claims{
		Subject:  id.String(),
		Audience: jwt.Audience(audience),
		Expiry:   jwt.NewNumericDate(exp),
		IssuedAt: jwt.NewNumericDate(now),
	}
	tok, err := jwt.Signed(j.signer).Claims(claims).Serialize()
	if err != nil {
		return "", time.Time{}, fmt.Errorf("sign JWT-SVID: %w", err)
	}
	return tok, exp, nil
}
