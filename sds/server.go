// Package sds serves Envoy's Secret Discovery Service (v3): each caller's
// own SVIDs and the trust bundles, pushed whenever they change.
//
// It implements go-control-plane's SecretDiscoveryServiceServer with
// Envoy's own protos, but not on go-control-plane's snapshot cache: that
// cache keys secrets on node.id, which any client can claim, and answers a
// NACK at once with the same snapshot, an endless loop with Envoy. Here the
// authenticated caller decides what is served, and a NACK is logged,
// counted and not answered until the content really changes.
package sds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/meshid/identity"
)

// Source gives an authenticated caller its live identities.
type Source interface {
	Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error)
}

// Authenticator says who is calling, from the gRPC context (peer
// credentials, client certificate, token); never from what the client
// claims in its request.
type Authenticator func(ctx context.Context) (identity.Caller, error)

// Metrics are the SDS server's Prometheus metrics.
type Metrics struct {
	Streams prometheus.Gauge
	Pushes  prometheus.Counter
	NACKs   prometheus.Counter
	Refused prometheus.Counter
}

// NewMetrics creates and registers the SDS metrics.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshid_sds_streams", Help: "Open SDS streams."}),
		Pushes:  prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_pushes_total", Help: "SDS responses sent."}),
		NACKs:   prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_nacks_total", Help: "SDS responses rejected by the client (NACK)."}),
		Refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_refused_total", Help: "Secret names asked for by a caller not entitled to them."}),
	}
	if reg != nil {
		reg.MustRegister(m.Streams, m.Pushes, m.NACKs, m.Refused)
	}
	return m
}

// Server is the SDS gRPC service.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	src     Source
	auth    Authenticator
	log     *slog.Logger
	metrics *Metrics
	done    chan struct{}
	stop    sync.Once
	seq     atomic.Uint64

	// encoded caches marshalled secrets by name and content key: a bundle
	// change pushed to thousands of streams is marshalled once.
	encMu   sync.Mutex
	encoded map[string]*anypb.Any
}

// New returns an SDS server. metrics may be nil.
func New(src Source, auth Authenticator, log *slog.Logger, metrics *Metrics) *Server {
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{src: src, auth: auth, log: log, metrics: metrics, done: make(chan struct{}), encoded: map[string]*anypb.Any{}}
}

// Register adds the service to a gRPC server.
func (s *Server) Register(g grpc.ServiceRegistrar) { secretv3.RegisterSecretDiscoveryServiceServer(g, s) }

// Shutdown ends every open stream cleanly (status OK), so a draining gRPC
// server does not wait on them forever.
func (s *Server) Shutdown() { s.stop.Do(func() { close(s.done) }) }

const maxEncoded = 4096

func (s *Server) encode(name string, r resolved) (*anypb.Any, error) {
	k := name + "\x00" + r.key
	s.encMu.Lock()
	a, ok := s.encoded[k]
	s.encMu.Unlock()
	if ok {
		return a, nil
	}
	sec, err := r.build()
	if err != nil {
		return nil, err
	}
	a, err = anypb.New(sec)
	if err != nil {
		return nil, fmt.Errorf("marshal secret %s: %w", name, err)
	}
	s.encMu.Lock()
	if len(s.encoded) >= maxEncoded {
		clear(s.encoded) // renewals retire keys for good; start over rather than track them
	}
	s.encoded[k] = a
	s.encMu.Unlock()
	return a, nil
}

func (s *Server) next() string { return strconv.FormatUint(s.seq.Add(1), 10) }

func (s *Server) subscribe(ctx context.Context) (identity.Caller, identity.Subscription, error) {
	caller, err := s.auth(ctx)
	if err != nil {
		return identity.Caller{}, nil, status.Error(codes.Unauthenticated, err.Error())
	}
	sub, err := s.src.Subscribe(ctx, caller)
	if err != nil {
		s.log.Error("sds subscribe", "caller", caller.Label, "err", err)
		return caller, nil, status.Error(codes.Unavailable, "identities unavailable; retry")
	}
	return caller, sub, nil
}

// refused logs and counts a name the caller may not have, once per stream.
func (s *Server) refused(caller identity.Caller, name string, seen map[string]bool) {
	if seen[name] {
		return
	}
	seen[name] = true
	s.metrics.Refused.Inc()
	s.log.Warn("sds: caller is not entitled to secret; not answered", "caller", caller.Label, "name", name)
}

// recvLoop forwards requests from the stream until it fails or ctx ends.
func recvLoop[T any](ctx context.Context, recv func() (T, error), out chan<- T, errc chan<- error) {
	for {
		req, err := recv()
		if err != nil {
			errc <- err
			return
		}
		select {
		case out <- req:
		case <-ctx.Done():
			return
		}
	}
}

func streamEnd(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	if status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}

// StreamSecrets is the state-of-the-world SDS stream Envoy opens per secret
// name (api_type GRPC).
func (s *Server) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	caller, sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.metrics.Streams.Inc()
	defer s.metrics.Streams.Dec()

	reqs := make(chan *discoveryv3.DiscoveryRequest, 1)
	errc := make(chan error, 1)
	go recvLoop(ctx, stream.Recv, reqs, errc)

	var (
		names     []string
		started   bool
		lastNonce string
		sent      = map[string]string{} // name -> content key last sent
		refusedN  = map[string]bool{}
	)
	// push sends every answerable requested name if any of them differs
	// from what was last sent (or force, for a new subscription).
	push := func(force bool) error {
		snap := sub.Snapshot()
		var resources []*anypb.Any
		changed := force
		keys := map[string]string{}
		for _, n := range names {
			r, ok := resolve(n, snap)
			if !ok {
				s.refused(caller, n, refusedN)
				continue
			}
			keys[n] = r.key
			if sent[n] != r.key {
				changed = true
			}
			a, err := s.encode(n, r)
			if err != nil {
				return status.Error(codes.Internal, "encode secret")
			}
			resources = append(resources, a)
		}
		if !changed || len(resources) == 0 {
			return nil
		}
		lastNonce = s.next()
		resp := &discoveryv3.DiscoveryResponse{
			VersionInfo: lastNonce,
			Resources:   resources,
			TypeUrl:     SecretTypeURL,
			Nonce:       lastNonce,
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		s.metrics.Pushes.Inc()
		sent = keys
		return nil
	}

	for {
		select {
		case <-s.done:
			return nil
		case err := <-errc:
			return streamEnd(err)
		case <-sub.Changed():
			if !started {
				continue
			}
			if err := push(false); err != nil {
				return err
			}
		case req := <-reqs:
			if t := req.GetTypeUrl(); t != "" && t != SecretTypeURL {
				return status.Errorf(codes.InvalidArgument, "type_url %q: this server serves only %s", t, SecretTypeURL)
			}
			if started && req.GetResponseNonce() != "" && req.GetResponseNonce() != lastNonce {
				continue // stale: answers a response that has been superseded
			}
			if req.GetErrorDetail() != nil {
				// NACK: Envoy keeps what it had. Re-sending the same content
				// would loop; the next real change is the next push.
				s.metrics.NACKs.Inc()
				s.log.Warn("sds: client rejected secrets (NACK)", "caller", caller.Label, "node", req.GetNode().GetId(),
					"names", req.GetResourceNames(), "nonce", req.GetResponseNonce(), "detail", req.GetErrorDetail().GetMessage())
			}
			newNames := slices.Clone(req.GetResourceNames())
			slices.Sort(newNames)
			if !started || !slices.Equal(newNames, names) {
				started = true
				names = newNames
				if err := push(true); err != nil {
					return err
				}
			}
		}
	}
}

// contentVersion is a delta resource version: a digest of the content key,
// stable across streams and reconnects, so initial_resource_versions can
// be honoured.
func contentVersion(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:8])
}

// DeltaSecrets is the incremental SDS stream (api_type DELTA_GRPC).
func (s *Server) DeltaSecrets(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	caller, sub, err := s.subscribe(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.metrics.Streams.Inc()
	defer s.metrics.Streams.Dec()

	reqs := make(chan *discoveryv3.DeltaDiscoveryRequest, 1)
	errc := make(chan error, 1)
	go recvLoop(ctx, stream.Recv, reqs, errc)

	var (
		subscribed = map[string]bool{}
		known      = map[string]string{} // name -> version the client holds
		removed    = map[string]bool{}   // names already reported removed
		lastNonce  string
		refusedN   = map[string]bool{}
	)
	push := func() error {
		snap := sub.Snapshot()
		resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: SecretTypeURL}
		for _, n := range sortedKeys(subscribed) {
			r, ok := resolve(n, snap)
			if !ok {
				s.refused(caller, n, refusedN)
				if !removed[n] {
					// The protocol's "does not exist": a removal, once.
					resp.RemovedResources = append(resp.RemovedResources, n)
					removed[n] = true
					delete(known, n)
				}
				continue
			}
			v := contentVersion(r.key)
			if known[n] == v {
				continue
			}
			a, err := s.encode(n, r)
			if err != nil {
				return status.Error(codes.Internal, "encode secret")
			}
			resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: n, Version: v, Resource: a})
			known[n] = v
			delete(removed, n)
		}
		if len(resp.Resources) == 0 && len(resp.RemovedResources) == 0 {
			return nil
		}
		lastNonce = s.next()
		resp.SystemVersionInfo = lastNonce
		resp.Nonce = lastNonce
		if err := stream.Send(resp); err != nil {
			return err
		}
		s.metrics.Pushes.Inc()
		return nil
	}

	first := true
	for {
		select {
		case <-s.done:
			return nil
		case err := <-errc:
			return streamEnd(err)
		case <-sub.Changed():
			if first {
				continue
			}
			if err := push(); err != nil {
				return err
			}
		case req := <-reqs:
			if t := req.GetTypeUrl(); t != "" && t != SecretTypeURL {
				return status.Errorf(codes.InvalidArgument, "type_url %q: this server serves only %s", t, SecretTypeURL)
			}
			if first {
				for n, v := range req.GetInitialResourceVersions() {
					known[n] = v
				}
			}
			first = false
			stale := req.GetResponseNonce() != "" && req.GetResponseNonce() != lastNonce
			if req.GetErrorDetail() != nil && !stale {
				s.metrics.NACKs.Inc()
				s.log.Warn("sds: client rejected secrets (NACK)", "caller", caller.Label, "node", req.GetNode().GetId(),
					"nonce", req.GetResponseNonce(), "detail", req.GetErrorDetail().GetMessage())
			}
			// Subscription changes count even with a stale nonce.
			for _, n := range req.GetResourceNamesSubscribe() {
				subscribed[n] = true
			}
			for _, n := range req.GetResourceNamesUnsubscribe() {
				delete(subscribed, n)
				delete(known, n)
				delete(removed, n)
			}
			if err := push(); err != nil {
				return err
			}
		}
	}
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// FetchSecrets answers one request (gRPC unary). Envoy itself never calls
// it (its REST mode POSTs JSON instead, see HTTPHandler); other clients do.
func (s *Server) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	return s.fetch(ctx, req)
}

func (s *Server) fetch(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if err := checkFetch(req); err != nil {
		return nil, err
	}
	caller, err := s.auth(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	return s.fetchFor(ctx, caller, req)
}

func checkFetch(req *discoveryv3.DiscoveryRequest) error {
	if t := req.GetTypeUrl(); t != "" && t != SecretTypeURL {
		return status.Errorf(codes.InvalidArgument, "type_url %q: this server serves only %s", t, SecretTypeURL)
	}
	if len(req.GetResourceNames()) == 0 {
		return status.Error(codes.InvalidArgument, "resource_names is empty: name the secrets to fetch (default, ROOTCA, ALL or a SPIFFE ID)")
	}
	return nil
}

// fetchFor answers a one-shot request for an authenticated caller.
func (s *Server) fetchFor(ctx context.Context, caller identity.Caller, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	sub, err := s.src.Subscribe(ctx, caller)
	if err != nil {
		s.log.Error("sds subscribe", "caller", caller.Label, "err", err)
		return nil, status.Error(codes.Unavailable, "identities unavailable; retry")
	}
	defer sub.Close()
	snap := sub.Snapshot()
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: SecretTypeURL}
	var keys []string
	seen := map[string]bool{}
	for _, n := range req.GetResourceNames() {
		r, ok := resolve(n, snap)
		if !ok {
			s.refused(caller, n, seen)
			continue
		}
		a, err := s.encode(n, r)
		if err != nil {
			return nil, status.Error(codes.Internal, "encode secret")
		}
		resp.Resources = append(resp.Resources, a)
		keys = append(keys, r.key)
	}
	if len(resp.Resources) == 0 {
		return nil, status.Errorf(codes.PermissionDenied, "caller is not entitled to any of %v", req.GetResourceNames())
	}
	resp.VersionInfo = contentVersion(fmt.Sprint(keys))
	return resp, nil
}
