package controlplane

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// JWT-SVIDs carry no serial and no CRL reaches them: a peer that validates
// one offline (against the JWT bundle) accepts it until it expires, at most
// JWTTTL. ValidateJWTSVID on the Workload API does better: it refuses a
// token of an identity one of whose entries was deleted (by entry delete
// or by revoking the SPIFFE ID) after the token was issued. JWT-SVIDs are
// only ever signed for an entry's identity, so that covers every revocation
// that reaches them. The cut-off is the entry.delete audit event, which
// names the SPIFFE ID, so a restart keeps refusing; it is kept for JWTTTL,
// after which every token it could refuse has expired anyway.

// jwtRevocations maps a SPIFFE ID to the moment its JWT-SVIDs stopped being
// good: a token issued at or before it is refused.
type jwtRevocations struct {
	mu     sync.Mutex
	cutoff map[string]time.Time
	loaded bool
}

// revokeJWTs refuses, from now on, JWT-SVIDs of id issued until at.
func (s *Server) revokeJWTs(id string, at time.Time) {
	r := &s.jwtRev
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cutoff == nil {
		r.cutoff = map[string]time.Time{}
	}
	if at.After(r.cutoff[id]) {
		r.cutoff[id] = at
	}
}

// entrySpiffeID is the SPIFFE ID of entry id, if it is known.
func (s *Server) entrySpiffeID(id string) string {
	e, _ := s.entries.get(id)
	return e.SpiffeID
}

// CheckJWTSVID refuses a JWT-SVID (already verified and unexpired) of an
// identity revoked after issuedAt. The Workload API's ValidateJWTSVID calls
// it.
func (s *Server) CheckJWTSVID(ctx context.Context, id spiffeid.ID, issuedAt time.Time) error {
	if err := s.loadJWTRevocations(ctx); err != nil {
		return err
	}
	now := s.now()
	r := &s.jwtRev
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, t := range r.cutoff {
		if now.Sub(t) > s.cfg.JWTTTL+time.Minute { // every token it refuses has expired
			delete(r.cutoff, k)
		}
	}
	// iat has whole seconds: a token of the revocation's own second may
	// predate it, so it is refused too.
	if t, ok := r.cutoff[id.String()]; ok && !issuedAt.After(t.Truncate(time.Second)) {
		return fmt.Errorf("%s was revoked at %s, after this token was issued", id, t.UTC().Format(time.RFC3339))
	}
	return nil
}

// loadJWTRevocations reads, once, the cut-offs recent enough to matter from
// the audit log.
func (s *Server) loadJWTRevocations(ctx context.Context) error {
	r := &s.jwtRev
	r.mu.Lock()
	loaded := r.loaded
	r.mu.Unlock()
	if loaded {
		return nil
	}
	since := s.now().Add(-s.cfg.JWTTTL - time.Minute)
	var found map[string]time.Time
	for limit := 256; ; limit *= 4 {
		evs, err := s.store.ListAudit(ctx, limit)
		if err != nil {
			return fmt.Errorf("read JWT-SVID revocations: %w", err)
		}
		found = map[string]time.Time{}
		old := false
		for _, ev := range evs { // newest first
			if ev.Time.Before(since) {
				old = true
				break
			}
			if ev.Action == "entry.delete" && strings.HasPrefix(ev.Detail, "spiffe://") {
				if t, ok := found[ev.Detail]; !ok || ev.Time.After(t) {
					found[ev.Detail] = ev.Time
				}
			}
		}
		if old || len(evs) < limit {
			break
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cutoff == nil {
		r.cutoff = map[string]time.Time{}
	}
	for k, t := range found {
		if c, ok := r.cutoff[k]; !ok || t.After(c) {
			r.cutoff[k] = t
		}
	}
	r.loaded = true
	return nil
}
