package controlplane

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/store"
)

// tokenPrefix marks meshid join tokens so they are recognisable in logs
// and secret scanners; agentTokenPrefix marks those that attest a node
// agent, so that each kind is refused where the other belongs without
// being spent.
const (
	tokenPrefix      = "mjt_"
	agentTokenPrefix = "mat_"
)

// MaxTokenTTL bounds a join token's life: it is a bearer credential.
const MaxTokenTTL = 30 * 24 * time.Hour

func hashToken(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// CreateJoinToken makes a join token granting spiffeID to whoever presents
// it over TCP, until ttl passes. The secret is returned once and only its
// hash is stored.
func (s *Server) CreateJoinToken(ctx context.Context, spiffeID string, ttl time.Duration, singleUse bool, actor string) (string, store.JoinToken, error) {
	if _, err := s.parseWorkloadID(spiffeID); err != nil {
		return "", store.JoinToken{}, err
	}
	if err := s.checkNotReserved(spiffeID); err != nil {
		return "", store.JoinToken{}, err
	}
	// A new token is the administrator's word that the identity may be
	// served to remote callers again after a revocation.
	defer s.match.unban(spiffeID)
	return s.createToken(ctx, tokenPrefix, spiffeID, ttl, singleUse, actor)
}

// createToken stores a new token for spiffeID (checked by the caller).
func (s *Server) createToken(ctx context.Context, prefix, spiffeID string, ttl time.Duration, singleUse bool, actor string) (string, store.JoinToken, error) {
	if ttl <= 0 || ttl > MaxTokenTTL {
		return "", store.JoinToken{}, invalidf("token ttl %s must be between 1s and %s", ttl, MaxTokenTTL)
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", store.JoinToken{}, fmt.Errorf("token secret: %w", err)
	}
	secret := prefix + base64.RawURLEncoding.EncodeToString(b[:])
	now := s.now()
	t := store.JoinToken{Hash: hashToken(secret), SpiffeID: spiffeID, ExpiresAt: now.Add(ttl), SingleUse: singleUse, CreatedAt: now}
	use := "reusable"
	if singleUse {
		use = "single-use"
	}
	if err := s.store.CreateToken(ctx, t, store.AuditEvent{
		Time: now, Actor: actor, Action: "token.create", Target: t.Hash[:16],
		Detail: fmt.Sprintf("%s %s until %s", use, spiffeID, t.ExpiresAt.UTC().Format(time.RFC3339)),
	}); err != nil {
		return "", store.JoinToken{}, fmt.Errorf("store token: %w", err)
	}
	return secret, t, nil
}

// ErrBadToken is returned for an unknown, expired or spent token; the
// caller is not told which.
var ErrBadToken = errors.New("join token is unknown, expired or already used")

// RedeemJoinToken checks a bearer token presented on connection conn and
// returns the identity it grants. A single-use token is bound, in the
// store, to the connection that first presented it: Envoy opens one
// stream per secret name and sends the token on each, so the streams of
// that connection all pass (on any replica), and any other connection is
// refused.
func (s *Server) RedeemJoinToken(ctx context.Context, secret, conn string) (spiffeid.ID, error) {
	if !strings.HasPrefix(secret, tokenPrefix) {
		return spiffeid.ID{}, ErrBadToken
	}
	t, err := s.store.UseToken(ctx, hashToken(secret), s.now(), bindingOf(conn))
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return spiffeid.ID{}, ErrBadToken
		}
		return spiffeid.ID{}, fmt.Errorf("redeem token: %w", err)
	}
	id, err := spiffeid.FromString(t.SpiffeID)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("token names invalid spiffe id: %w", err)
	}
	return id, nil
}

// bindingOf is what the store keeps of a connection's ID (TLS exported
// keying material, see connID): a digest, so the store holds nothing
// derived from a live session's secrets.
func bindingOf(conn string) string {
	if conn == "" {
		return ""
	}
	sum := sha256.Sum256([]byte("meshid token binding\x00" + conn))
	return hex.EncodeToString(sum[:16])
}
