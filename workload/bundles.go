package workload

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/identity"
)

// BundleSource is implemented by a Source that can serve the trust bundles
// alone. The verifier RPCs (FetchX509Bundles, FetchJWTBundles,
// ValidateJWTSVID) use it when it is there: they read bundles, and a
// caller that only verifies should not have SVIDs signed (and inventory
// rows written) for it on every call.
type BundleSource interface {
	SubscribeBundles(ctx context.Context, caller identity.Caller) (identity.Subscription, error)
}

// subscribeBundles is subscribe for the verifier RPCs: bundles only, where
// the Source can.
func (s *Server) subscribeBundles(ctx context.Context) (identity.Caller, identity.Subscription, error) {
	bs, ok := s.src.(BundleSource)
	if !ok {
		return s.subscribe(ctx)
	}
	c, err := s.caller(ctx)
	if err != nil {
		return c, nil, err
	}
	sub, err := bs.SubscribeBundles(ctx, c)
	if err != nil {
		s.log.Error("workload api subscribe", "caller", c.Label, "err", err)
		return c, nil, status.Error(codes.Unavailable, "identities unavailable; retry")
	}
	return c, sub, nil
}
