package controlplane

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/store"
)

// jwtKeyView is one JWT signing key as persisted.
type jwtKeyView struct {
	rec store.CARecord
	pub any
}

func (s *Server) unsealJWT(k *kek.KEK, rec store.CARecord) (*ca.JWTAuthority, error) {
	der, err := k.Open(rec.SealedKey, []byte(rec.ID))
	if err != nil {
		return nil, fmt.Errorf("JWT key %s: unseal: %w", rec.ID, err)
	}
	key, err := parseSigner(der)
	if err != nil {
		return nil, fmt.Errorf("JWT key %s: %w", rec.ID, err)
	}
	j, err := ca.LoadJWTAuthority(s.td, key, rec.NotAfter)
	if err != nil {
		return nil, fmt.Errorf("JWT key %s: %w", rec.ID, err)
	}
	return j, nil
}

func (s *Server) newJWTKey(k *kek.KEK, state store.CAState) (*ca.JWTAuthority, store.CARecord, error) {
	now := s.now()
	j, err := ca.NewJWTAuthority(s.td, s.cfg.CATTL, now)
	if err != nil {
		return nil, store.CARecord{}, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(j.Key)
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("marshal JWT key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(j.Key.Public())
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("marshal JWT public key: %w", err)
	}
	id := "jwt-" + j.KeyID
	sealed, err := k.Seal(der, []byte(id))
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("seal JWT key: %w", err)
	}
	return j, store.CARecord{ID: id, Kind: "jwt", State: state, PublicKey: pub, SealedKey: sealed,
		NotBefore: now, NotAfter: j.NotAfter, CreatedAt: now}, nil
}

// prepareJWT publishes the next JWT key with the next X.509 CA.
func (s *Server) prepareJWT(ctx context.Context, actor string) error {
	s.mu.RLock()
	for _, v := range s.jwtKeys {
		if v.rec.State == store.CAPrepared {
			s.mu.RUnlock()
			return nil
		}
	}
	s.mu.RUnlock()
	_, rec, err := s.newJWTKey(s.kek, store.CAPrepared)
	if err != nil {
		return err
	}
	if err := s.store.PutCA(ctx, rec, &store.AuditEvent{Time: rec.CreatedAt, Actor: actor, Action: "jwt.prepare", Target: rec.ID}); err != nil {
		return fmt.Errorf("store prepared JWT key: %w", err)
	}
	return s.synced(ctx)
}

// activateJWT signs with the prepared JWT key from now on. The old key
// stays in the JWT bundle until the last token it signed has expired: its
// record's NotAfter becomes that moment, so a restart keeps the schedule.
func (s *Server) activateJWT(ctx context.Context, actor string) error {
	s.mu.RLock()
	views := slices.Clone(s.jwtKeys)
	s.mu.RUnlock()
	pi := slices.IndexFunc(views, func(v jwtKeyView) bool { return v.rec.State == store.CAPrepared })
	if pi < 0 {
		// A crash between preparing the CA and its JWT key: make the key
		// now rather than keep signing with one about to expire. Tokens it
		// signs are only trusted by peers once they have the new JWKS,
		// pushed with this activation.
		if err := s.prepareJWT(ctx, actor); err != nil {
			return err
		}
		s.mu.RLock()
		views = slices.Clone(s.jwtKeys)
		s.mu.RUnlock()
		pi = slices.IndexFunc(views, func(v jwtKeyView) bool { return v.rec.State == store.CAPrepared })
	}
	now := s.now()
	// Unsealed here only to fail before any write if the key is unusable.
	if _, err := s.unsealJWT(s.kek, views[pi].rec); err != nil {
		return err
	}
	views[pi].rec.State = store.CAActive
	if err := s.store.PutCA(ctx, views[pi].rec, &store.AuditEvent{Time: now, Actor: actor, Action: "jwt.activate", Target: views[pi].rec.ID}); err != nil {
		return fmt.Errorf("activate JWT key: %w", err)
	}
	for i := range views {
		if i == pi || views[i].rec.State != store.CAActive {
			continue
		}
		views[i].rec.State = store.CARetired
		views[i].rec.NotAfter = now.Add(s.cfg.JWTTTL)
		if err := s.store.PutCA(ctx, views[i].rec, &store.AuditEvent{Time: now, Actor: actor, Action: "jwt.retire", Target: views[i].rec.ID}); err != nil {
			return fmt.Errorf("retire JWT key: %w", err)
		}
	}
	return nil
}

// jwtBundle is the JWKS of every JWT key not yet expired.
func (s *Server) jwtBundle() (*identity.JWTBundle, error) {
	s.mu.RLock()
	views := s.jwtKeys
	s.mu.RUnlock()
	b := jwtbundle.New(s.td)
	now := s.now()
	for _, v := range views {
		if now.After(v.rec.NotAfter) {
			continue
		}
		kid, err := ca.JWTKeyID(v.pub)
		if err != nil {
			return nil, err
		}
		b.AddJWTAuthority(kid, v.pub)
	}
	js, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("marshal JWT bundle: %w", err)
	}
	sum := sha256.Sum256(js)
	return &identity.JWTBundle{TrustDomain: s.td, JWKS: js, Version: hex.EncodeToString(sum[:8])}, nil
}

// MintJWTSVID signs JWT-SVIDs for a caller: with id "" one for each
// identity it holds (its default first), else for id, which it must hold.
func (s *Server) MintJWTSVID(ctx context.Context, caller identity.Caller, audience []string, id string) ([]*identity.JWTSVID, error) {
	var want spiffeid.ID
	if id != "" {
		var err error
		if want, err = spiffeid.FromString(id); err != nil {
			return nil, invalidf("invalid spiffe id %q: %v", id, err)
		}
	}
	if len(audience) == 0 {
		return nil, invalidf("audience is required")
	}
	entries := s.match.Match(caller)
	s.mu.RLock()
	j := s.jwt
	s.mu.RUnlock()
	now := s.now()
	var out []*identity.JWTSVID
	var failed error // the first entry that could not be minted
	seen := map[string]bool{}
	for _, e := range entries {
		if seen[e.SpiffeID] || (id != "" && e.SpiffeID != want.String()) {
			continue
		}
		seen[e.SpiffeID] = true
		sid, err := spiffeid.FromString(e.SpiffeID)
		if err == nil {
			var tok string
			var exp time.Time
			if tok, exp, err = j.MintJWTSVID(sid, audience, s.cfg.JWTTTL, now); err == nil {
				s.metrics.Issued.WithLabelValues("jwt").Inc()
				out = append(out, &identity.JWTSVID{ID: sid, Token: tok, Hint: e.Hint, ExpiresAt: exp})
				continue
			}
		}
		s.metrics.IssueErrors.Inc()
		if errors.Is(err, ca.ErrInvalidJWTRequest) {
			// The request itself (its audience) is bad, for every entry.
			return nil, &InvalidArgumentError{msg: err.Error()}
		}
		// One entry the CA refuses (one stored by an older version) costs
		// the caller only that identity, as on the X.509 path.
		s.metrics.MintFailures.WithLabelValues("invalid").Inc()
		s.log.Error("jwt-svid mint failed; the caller's other identities are served", "entry", e.ID, "spiffe_id", e.SpiffeID, "err", err)
		if failed == nil {
			failed = &InvalidArgumentError{msg: fmt.Sprintf("entry %s: %v", e.ID, err)}
		}
	}
	if len(out) == 0 {
		if failed != nil {
			return nil, failed
		}
		if id != "" {
			return nil, fmt.Errorf("%s: %w", id, identity.ErrNotEntitled)
		}
		return nil, identity.ErrNotEntitled
	}
	return out, nil
}
