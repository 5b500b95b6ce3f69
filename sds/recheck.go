package sds

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/identity"
)

// errCallerGone ends a stream or refuses an answer when the caller is no
// longer what was attested (its process exited, or its pid was reused).
var errCallerGone = status.Error(codes.PermissionDenied, "caller is no longer the attested process")

// recheck runs the caller's re-check before a send: what was attested
// about a local process holds only while it runs under its pid.
func (s *Server) recheck(c identity.Caller) error {
	if err := c.Recheck(); err != nil {
		s.log.Warn("sds: caller no longer attested; not answered", "caller", c.Label, "err", err)
		return errCallerGone
	}
	return nil
}

// recheck re-checks the stream's caller. st.mu is held.
func (b *streamBase) recheck() error { return b.s.recheck(b.caller) }
