package workload

import (
	"context"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// JWTRevocations is implemented by a Source that knows revoked identities:
// ValidateJWTSVID then also refuses a well-signed, unexpired JWT-SVID of an
// identity revoked after it was issued. (Peers validating offline against
// the JWT bundle cannot know; they accept it until it expires.)
type JWTRevocations interface {
	CheckJWTSVID(ctx context.Context, id spiffeid.ID, issuedAt time.Time) error
}

// checkRevoked asks src, if it can tell, whether svid's identity was
// revoked after svid was issued.
func checkRevoked(ctx context.Context, src Source, svid *jwtsvid.SVID) error {
	rc, ok := src.(JWTRevocations)
	if !ok {
		return nil
	}
	iat, ok := svid.Claims["iat"].(float64)
	if !ok {
		// meshid always signs an iat, so this token is some other
		// issuer's (a federated trust domain's): not ours to revoke.
		return nil
	}
	return rc.CheckJWTSVID(ctx, svid.ID, time.Unix(int64(iat), 0))
}
