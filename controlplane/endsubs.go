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
func (s *Server) endSerials(serials map[string]bool) int {
	if len(serials) == 0 {
		return 0
	}
	return s.ids.EndCallers(func(c identity.Caller) bool {
		return c.Serial != "" && serials[normSerial(c.Serial)]
	}, func(c identity.Caller) error {
		return fmt.Errorf("%w: client certificate %s", ErrCredentialRevoked, normSerial(c.Serial))
	})
}

// endDirect ends every subscription whose caller holds id directly (by
// certificate or join token): the identity was revoked.
func (s *Server) endDirect(id string) int {
	return s.ids.EndCallers(func(c identity.Caller) bool {
		return slices.ContainsFunc(c.IDs, func(x spiffeid.ID) bool { return x.String() == id })
	}, func(identity.Caller) error {
		return fmt.Errorf("%w: identity %s", ErrCredentialRevoked, id)
	})
}

// serialRevoked reports whether serial (hex) is on a CRL.
func (s *Server) serialRevoked(serial string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.revoked.Contains(serial)
}
