// Package workload serves the SPIFFE Workload API (X.509-SVID and JWT-SVID
// profiles) with go-spiffe's generated protos: each caller's own SVIDs and
// the trust bundles, pushed whenever they change.
//
// Like sds/, it does not know where SVIDs come from: a Source gives an
// authenticated caller its live identities (identity.Subscription) and
// signs JWT-SVIDs for it. The caller is whoever the authenticator says
// (peer credentials on the workload socket), never what the request claims.
//
// Behaviour follows the SPIFFE Workload API standard:
//   - every RPC requires the metadata header "workload.spiffe.io: true",
//     else InvalidArgument;
//   - FetchX509SVID and FetchJWTSVID answer PermissionDenied to a caller
//     that holds no identity (and FetchX509SVID ends its stream that way if
//     every SVID is withdrawn later);
//   - FetchX509Bundles, FetchJWTBundles and ValidateJWTSVID also serve
//     callers that hold no identity ("verifiers"), as SPIRE does with
//     allow_unauthenticated_verifiers: the bundle is public material and
//     the spec offers these RPCs to clients "without obtaining an SVID for
//     themself". Only a caller entitled to no bundle at all is refused;
//   - every stream message is complete, the first is sent at once, and a
//     message identical to the last one sent on the stream is never re-sent.
//   - The WIT-SVID profile is optional and answers Unimplemented.
package workload

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"github.com/prometheus/client_golang/prometheus"
	"log/slog"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/ratelog"
)

// Source gives an authenticated caller its live identities and signs
// JWT-SVIDs for it.
type Source interface {
	Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error)
	// MintJWTSVID signs JWT-SVIDs for the caller: for id "" one per
	// identity it holds (default first), else for that ID if it holds it.
	// A caller that holds none of them gets identity.ErrNotEntitled (an
	// empty result means the same).
	MintJWTSVID(ctx context.Context, caller identity.Caller, audience []string, id string) ([]*identity.JWTSVID, error)
}

// Authenticator says who is calling, from the gRPC context (peer
// credentials); never from what the client claims in its request.
type Authenticator = func(ctx context.Context) (identity.Caller, error)

// HeaderKey is the metadata key every Workload API request must carry with
// the value "true" (SPIFFE Workload Endpoint: proof that the request was
// not forged by, for example, a browser following a redirect).
const HeaderKey = "workload.spiffe.io"

// Server is the SPIFFE Workload API gRPC service.
type Server struct {
	pb.UnimplementedSpiffeWorkloadAPIServer
	src  Source
	auth Authenticator
	log  *slog.Logger
	done chan struct{}
	stop sync.Once
	// streams counts open streams (meshid_workload_streams); nil is fine.
	streams prometheus.Gauge
	// clientLog carries the refusals a client can provoke in a loop,
	// bounded per caller so it cannot fill the disk.
	clientLog *ratelog.Limiter
	// watchers are the open X.509 streams, for BundleVersions.
	watchers watchers
}

// SetStreamsGauge makes the server count its open streams in g.
func (s *Server) SetStreamsGauge(g prometheus.Gauge) { s.streams = g }

// New returns a Workload API server. log may be nil.
func New(src Source, auth func(ctx context.Context) (identity.Caller, error), log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{src: src, auth: auth, log: log, done: make(chan struct{}), clientLog: ratelog.New(log)}
}

// Register adds the service to a gRPC server.
func (s *Server) Register(g grpc.ServiceRegistrar) { pb.RegisterSpiffeWorkloadAPIServer(g, s) }

// Shutdown ends every open stream cleanly (status OK), so a draining gRPC
// server does not wait on them forever. Clients reconnect, as the spec
// tells them to.
func (s *Server) Shutdown() { s.stop.Do(func() { close(s.done) }) }

// checkHeader enforces the security header.
func checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if v := md.Get(HeaderKey); !ok || len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request: set metadata \"workload.spiffe.io: true\"")
	}
	return nil
}

// caller checks the header and identifies the caller.
func (s *Server) caller(ctx context.Context) (identity.Caller, error) {
	if err := checkHeader(ctx); err != nil {
		return identity.Caller{}, err
	}
	c, err := s.auth(ctx)
	if err != nil {
		// No label yet: all unidentified callers share one budget.
		s.clientLog.Log(ctx, slog.LevelWarn, "", "workload api: caller could not be identified", "err", ratelog.Truncate(err.Error()))
		return identity.Caller{}, status.Error(codes.PermissionDenied, "caller could not be identified")
	}
	return c, nil
}

// subscribe checks the header, identifies the caller and subscribes it.
func (s *Server) subscribe(ctx context.Context) (identity.Caller, identity.Subscription, error) {
	c, err := s.caller(ctx)
	if err != nil {
		return c, nil, err
	}
	sub, err := s.src.Subscribe(ctx, c)
	if err != nil {
		s.log.Error("workload api subscribe", "caller", c.Label, "err", err)
		return c, nil, status.Error(codes.Unavailable, "identities unavailable; retry")
	}
	return c, sub, nil
}

// errNoIdentity is the spec's answer to a caller entitled to no SVID.
var errNoIdentity = status.Error(codes.PermissionDenied, "no identity issued")

// errCallerGone ends a stream or refuses an answer when the caller is no
// longer what was attested (its process exited, or its pid was reused).
var errCallerGone = status.Error(codes.PermissionDenied, "caller is no longer the attested process")

// recheck runs the caller's re-check before a send.
func (s *Server) recheck(c identity.Caller, rpc string) error {
	if err := c.Recheck(); err != nil {
		s.log.Warn("workload api: caller no longer attested; not answered", "caller", c.Label, "rpc", rpc, "err", err)
		return errCallerGone
	}
	return nil
}

// watch runs one server stream: it builds a response from each snapshot
// and sends it when it differs from the last one sent. build returns a
// status error to end the stream (e.g. PermissionDenied once nothing is
// left to serve). Before every send the caller is re-checked.
func watch[R proto.Message](s *Server, ctx context.Context, caller identity.Caller, rpc string, sub identity.Subscription, send func(R) error, build func(*identity.Snapshot) (R, error)) error {
	if s.streams != nil {
		s.streams.Inc()
		defer s.streams.Dec()
	}
	w := s.track(rpc)
	defer s.untrack(w)
	var last R
	sent := false
	for {
		snap := sub.Snapshot()
		resp, err := build(snap)
		if err != nil {
			return err
		}
		if !sent || !proto.Equal(resp, last) {
			if err := s.recheck(caller, rpc); err != nil {
				return err
			}
			if err := send(resp); err != nil {
				return err
			}
			w.sent(snap)
			last, sent = resp, true
		}
		select {
		case <-s.done:
			return nil
		case <-ctx.Done():
			return nil
		case <-sub.Changed():
		}
	}
}

// FetchX509SVID streams the caller's X.509-SVIDs (default first), each
// with its key, hint and its trust domain's bundle.
func (s *Server) FetchX509SVID(_ *pb.X509SVIDRequest, stream grpc.ServerStreamingServer[pb.X509SVIDResponse]) error {
	ctx := stream.Context()
	caller, sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.log.Debug("workload api: FetchX509SVID", "caller", caller.Label)
	return watch(s, ctx, caller, "FetchX509SVID", sub, stream.Send, func(snap *identity.Snapshot) (*pb.X509SVIDResponse, error) {
		resp, err := x509SVIDResponse(snap)
		if err != nil {
			if status.Code(err) == codes.PermissionDenied {
				s.clientLog.Log(ctx, slog.LevelWarn, caller.Label, "workload api: no identity issued", "caller", caller.Label, "rpc", "FetchX509SVID")
			} else {
				s.log.Error("workload api: FetchX509SVID", "caller", caller.Label, "err", err)
			}
		}
		return resp, err
	})
}

func x509SVIDResponse(snap *identity.Snapshot) (*pb.X509SVIDResponse, error) {
	if len(snap.SVIDs) == 0 {
		return nil, errNoIdentity
	}
	resp := &pb.X509SVIDResponse{Svids: make([]*pb.X509SVID, 0, len(snap.SVIDs))}
	hints := map[string]bool{}
	for _, v := range snap.SVIDs {
		b := snap.BundleFor(v.ID.TrustDomain())
		if b == nil || len(b.X509Authorities) == 0 {
			return nil, status.Errorf(codes.Unavailable, "no trust bundle for %s yet; retry", v.ID.TrustDomain())
		}
		hint := v.Hint
		if hints[hint] {
			hint = "" // hints must be unique within a response
		}
		hints[hint] = true
		resp.Svids = append(resp.Svids, &pb.X509SVID{
			SpiffeId:    v.ID.String(),
			X509Svid:    concatDER(v.Certs),
			X509SvidKey: v.KeyDER,
			Bundle:      bundleDER(b),
			Hint:        hint,
		})
	}
	// Revocations, pushed with every change like the bundle.
	for _, b := range snap.Bundles {
		resp.Crl = append(resp.Crl, b.CRLs...)
	}
	return resp, nil
}

// FetchX509Bundles streams the X.509 bundles the caller may trust, keyed
// by trust domain (its SPIFFE ID, "spiffe://td"), pushed when they change.
func (s *Server) FetchX509Bundles(_ *pb.X509BundlesRequest, stream grpc.ServerStreamingServer[pb.X509BundlesResponse]) error {
	ctx := stream.Context()
	caller, sub, err := s.subscribeBundles(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.log.Debug("workload api: FetchX509Bundles", "caller", caller.Label)
	return watch(s, ctx, caller, "FetchX509Bundles", sub, stream.Send, func(snap *identity.Snapshot) (*pb.X509BundlesResponse, error) {
		resp := &pb.X509BundlesResponse{Bundles: map[string][]byte{}}
		for _, b := range snap.Bundles {
			resp.Crl = append(resp.Crl, b.CRLs...)
			if len(b.X509Authorities) > 0 {
				resp.Bundles[b.TrustDomain.IDString()] = bundleDER(b)
			}
		}
		if len(resp.Bundles) == 0 {
			s.clientLog.Log(ctx, slog.LevelWarn, caller.Label, "workload api: no bundle for caller", "caller", caller.Label, "rpc", "FetchX509Bundles")
			return nil, status.Error(codes.PermissionDenied, "no bundle available to this caller")
		}
		return resp, nil
	})
}

// FetchJWTBundles streams the JWT bundles (JWKS) the caller may trust,
// keyed by trust domain, pushed when they change.
func (s *Server) FetchJWTBundles(_ *pb.JWTBundlesRequest, stream grpc.ServerStreamingServer[pb.JWTBundlesResponse]) error {
	ctx := stream.Context()
	caller, sub, err := s.subscribeBundles(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.log.Debug("workload api: FetchJWTBundles", "caller", caller.Label)
	return watch(s, ctx, caller, "FetchJWTBundles", sub, stream.Send, func(snap *identity.Snapshot) (*pb.JWTBundlesResponse, error) {
		resp := &pb.JWTBundlesResponse{Bundles: map[string][]byte{}}
		for _, b := range snap.JWTBundles {
			if len(b.JWKS) > 0 {
				resp.Bundles[b.TrustDomain.IDString()] = b.JWKS
			}
		}
		if len(resp.Bundles) == 0 {
			s.clientLog.Log(ctx, slog.LevelWarn, caller.Label, "workload api: no JWT bundle for caller", "caller", caller.Label, "rpc", "FetchJWTBundles")
			return nil, status.Error(codes.PermissionDenied, "no JWT bundle available to this caller")
		}
		return resp, nil
	})
}

// FetchJWTSVID signs JWT-SVIDs for the audience: one per identity the
// caller holds, or only the one it asks for.
func (s *Server) FetchJWTSVID(ctx context.Context, req *pb.JWTSVIDRequest) (*pb.JWTSVIDResponse, error) {
	caller, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	if len(req.GetAudience()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	for _, a := range req.GetAudience() {
		if a == "" {
			return nil, status.Error(codes.InvalidArgument, "audience must not contain an empty value")
		}
	}
	want := req.GetSpiffeId()
	if want != "" {
		id, err := spiffeid.FromString(want)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "spiffe_id %q: %v", want, err)
		}
		want = id.String()
	}
	svids, err := s.src.MintJWTSVID(ctx, caller, req.GetAudience(), want)
	if errors.Is(err, identity.ErrNotEntitled) {
		svids, err = nil, nil // answered below, as for an empty result
	}
	if err != nil {
		if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
			return nil, err
		}
		s.log.Error("workload api: mint JWT-SVID", "caller", caller.Label, "spiffe_id", ratelog.Truncate(want), "err", err)
		return nil, status.Error(codes.Unavailable, "could not sign JWT-SVID; retry")
	}
	resp := &pb.JWTSVIDResponse{}
	hints := map[string]bool{}
	for _, v := range svids {
		if v == nil || (want != "" && v.ID.String() != want) {
			continue
		}
		hint := v.Hint
		if hints[hint] {
			hint = ""
		}
		hints[hint] = true
		resp.Svids = append(resp.Svids, &pb.JWTSVID{SpiffeId: v.ID.String(), Svid: v.Token, Hint: hint})
	}
	if err := s.recheck(caller, "FetchJWTSVID"); err != nil {
		return nil, err
	}
	if len(resp.Svids) == 0 {
		s.clientLog.Log(ctx, slog.LevelWarn, caller.Label, "workload api: no identity issued", "caller", caller.Label, "rpc", "FetchJWTSVID", "spiffe_id", ratelog.Truncate(want))
		if want != "" {
			return nil, status.Errorf(codes.PermissionDenied, "caller is not entitled to %s", want)
		}
		return nil, errNoIdentity
	}
	return resp, nil
}

// ValidateJWTSVID validates a JWT-SVID for the audience against the JWT
// bundles the caller may trust, and returns its SPIFFE ID and claims.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *pb.ValidateJWTSVIDRequest) (*pb.ValidateJWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if req.GetAudience() == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.GetSvid() == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	caller, sub, err := s.subscribeBundles(ctx)
	if err != nil {
		return nil, err
	}
	snap := sub.Snapshot()
	sub.Close()
	if err := s.recheck(caller, "ValidateJWTSVID"); err != nil {
		return nil, err
	}
	set := jwtbundle.NewSet()
	for _, b := range snap.JWTBundles {
		jb, err := jwtbundle.Parse(b.TrustDomain, b.JWKS)
		if err != nil {
			s.log.Error("workload api: parse JWT bundle", "trust_domain", b.TrustDomain, "err", err)
			return nil, status.Error(codes.Unavailable, "JWT bundle unavailable; retry")
		}
		set.Add(jb)
	}
	svid, err := jwtsvid.ParseAndValidate(req.GetSvid(), set, []string{req.GetAudience()})
	if err != nil {
		s.clientLog.Log(ctx, slog.LevelInfo, caller.Label, "workload api: JWT-SVID rejected", "caller", caller.Label,
			"audience", ratelog.Truncate(req.GetAudience()), "err", ratelog.Truncate(err.Error()))
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	if err := checkRevoked(ctx, s.src, svid); err != nil {
		s.log.Info("workload api: JWT-SVID rejected", "caller", caller.Label, "audience", req.GetAudience(), "err", err)
		return nil, status.Errorf(codes.InvalidArgument, "invalid JWT-SVID: %v", err)
	}
	claims, err := claimsStruct(svid.Claims)
	if err != nil {
		s.log.Error("workload api: encode JWT claims", "err", err)
		return nil, status.Error(codes.Internal, "encode claims")
	}
	return &pb.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// claimsStruct turns decoded JWT claims into a protobuf Struct through
// JSON, which handles every JSON type the claims can hold.
func claimsStruct(claims map[string]any) (*structpb.Struct, error) {
	js, err := json.Marshal(claims)
	if err != nil {
		return nil, err
	}
	out := &structpb.Struct{}
	if err := protojson.Unmarshal(js, out); err != nil {
		return nil, err
	}
	return out, nil
}

// concatDER is the Workload API's encoding of a certificate list: the
// DER of each, concatenated.
func concatDER(certs []*x509.Certificate) []byte {
	n := 0
	for _, c := range certs {
		n += len(c.Raw)
	}
	out := make([]byte, 0, n)
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

func bundleDER(b *identity.Bundle) []byte { return concatDER(b.X509Authorities) }
