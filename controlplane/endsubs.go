package controlplane

import (
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/identity"
)

// ErrCredentialRevoked ends a subscription whose caller authenticated with
// a certificate, or held an identity, that has been revoked. SDS ends the
// stream with PermissionDenied; the caller must authenticate again, with
// a join token.
var ErrCredentialRevoked = identity.ErrRevoked

// endSerials ends every subscription whose caller authenticated with one
// of serials (normSerial form), and reports how many.
func (ids *identities) endSerials(serials map[string]bool) int {
	if len(serials) == 0 {
		return 0
	}
	ids.mu.Lock()
	defer ids.mu.Unlock()
	n := 0
	for s := range ids.subs {
		if s.caller.Serial != "" && serials[normSerial(s.caller.Serial)] {
			ids.endLocked(s, fmt.Errorf("%w: client certificate %s", ErrCredentialRevoked, normSerial(s.caller.Serial)))
			n++
		}
	}
	return n
}

// endDirect ends every subscription whose caller holds id directly (by
// certificate or join token): the identity was revoked.
func (ids *identities) endDirect(id string) int {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	n := 0
	for s := range ids.subs {
		if slices.ContainsFunc(s.caller.IDs, func(x spiffeid.ID) bool { return x.String() == id }) {
			ids.endLocked(s, fmt.Errorf("%w: identity %s", ErrCredentialRevoked, id))
			n++
		}
	}
	return n
}

// endLocked ends s: it gives up its slots (nothing more is renewed for it),
// serves nothing from now on, and is told through Changed. ids.mu is held.
func (ids *identities) endLocked(s *Subscription, err error) {
	if s.err != nil {
		return
	}
	s.err = err
	delete(ids.subs, s)
	for _, k := range s.entries {
		ids.release(k, s)
		// A slot minted for this caller's own certificate serves nobody
		// else; drop it rather than keep a revoked lineage for reuse.
		if sl := ids.slots[k]; sl != nil && sl.refs == 0 && directSerial(k) != "" {
			delete(ids.slots, k)
		}
	}
	s.entries = nil
	s.snap = &identity.Snapshot{}
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// revokedCaller is ErrCredentialRevoked if caller's certificate was revoked,
// or an ID it holds directly banned, while it was subscribing: checked
// after the subscription is registered, so that a concurrent revocation
// either ends it (endSerials, endDirect) or is seen here.
func (ids *identities) revokedCaller(c identity.Caller) error {
	if c.Serial != "" && ids.srv.serialRevoked(c.Serial) {
		return fmt.Errorf("%w: client certificate %s", ErrCredentialRevoked, normSerial(c.Serial))
	}
	ids.mu.Lock()
	defer ids.mu.Unlock()
	for _, id := range c.IDs {
		if ids.banned[id.String()] {
			return fmt.Errorf("%w: identity %s", ErrCredentialRevoked, id)
		}
	}
	return nil
}

// serialRevoked reports whether serial (hex) is on a CRL.
func (s *Server) serialRevoked(serial string) bool {
	serial = normSerial(serial)
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, list := range s.revoked {
		for _, r := range list {
			if normSerial(r.Serial) == serial {
				return true
			}
		}
	}
	return false
}
