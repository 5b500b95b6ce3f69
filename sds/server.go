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
	"github.com/meshid/meshid/internal/ratelog"
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
	// LargeSends are the responses being sent on a stream's own goroutine
	// (see writeBudget): a lasting non-zero value is clients not reading.
	LargeSends prometheus.Gauge
}

// NewMetrics creates and registers the SDS metrics.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshid_sds_streams", Help: "Open SDS streams."}),
		Pushes:  prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_pushes_total", Help: "SDS responses sent."}),
		NACKs:   prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_nacks_total", Help: "SDS responses rejected by the client (NACK)."}),
		Refused: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshid_sds_refused_total", Help: "Secret names asked for by a caller not entitled to them."}),
		LargeSends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshid_sds_large_sends_in_flight",
			Help: "SDS responses in flight that exceed what a stream may leave unread (64 KiB), each sent apart so it may wait for its client to read; lasting values are clients that do not read."}),
	}
	if reg != nil {
		reg.MustRegister(m.Streams, m.Pushes, m.NACKs, m.Refused, m.LargeSends)
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

	// pq is the queue of streams with something to send and the pool of
	// pusher goroutines that sends it (see pushers.go).
	pq pushQueue

	// clientLog carries the lines a client can provoke (NACKs, refused
	// names), bounded per caller so a looping client cannot fill the disk.
	clientLog *ratelog.Limiter

	// tracked are the open streams, for BundleVersions.
	tracked bundleStreams
}

// New returns an SDS server. metrics may be nil.
func New(src Source, auth Authenticator, log *slog.Logger, metrics *Metrics) *Server {
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{src: src, auth: auth, log: log, clientLog: ratelog.New(log), metrics: metrics, done: make(chan struct{}), encoded: map[string]*anypb.Any{}}
}

// Register adds the service to a gRPC server.
func (s *Server) Register(g grpc.ServiceRegistrar) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, s)
}

// Shutdown ends every open stream cleanly (status OK), so a draining gRPC
// server does not wait on them forever.
// The pusher goroutines stop too, and Shutdown waits for them: each
// finishes its current Send, which never waits for a client.
func (s *Server) Shutdown() {
	s.stop.Do(func() {
		close(s.done)
		s.pq.close()
	})
	s.pq.wait()
}

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
	if errors.Is(err, identity.ErrRevoked) {
		return caller, nil, status.Error(codes.PermissionDenied, err.Error())
	}
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
	s.clientLog.Log(context.Background(), slog.LevelWarn, caller.Label, "sds: caller is not entitled to secret; not answered",
		"caller", caller.Label, "name", ratelog.Truncate(name))
}

// logNACK logs a client's rejection of a response. Every value but the
// caller's label comes from the client, so each is truncated, and the line
// is rate-limited per caller.
func (s *Server) logNACK(caller identity.Caller, node string, names []string, nonce, detail string) {
	args := []any{"caller", caller.Label, "node", ratelog.Truncate(node)}
	if names != nil {
		args = append(args, "names", ratelog.TruncateList(names))
	}
	args = append(args, "nonce", ratelog.Truncate(nonce), "detail", ratelog.Truncate(detail))
	s.clientLog.Log(context.Background(), slog.LevelWarn, caller.Label, "sds: client rejected secrets (NACK)", args...)
}

func streamEnd(err error) error {
	var pf pushFailed
	if errors.As(err, &pf) {
		return pf.err
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	if status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}

func checkType(t string) error {
	if t != "" && t != SecretTypeURL {
		return status.Errorf(codes.InvalidArgument, "type_url %q: this server serves only %s", t, SecretTypeURL)
	}
	return nil
}

// sotwStream is one StreamSecrets stream.
type sotwStream struct {
	streamBase
	stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]

	// Guarded by mu:
	started   bool
	force     bool     // the names changed: answer even if no content did
	names     []string // sorted
	sent      []string // content key last sent for names[i]; "" if none
	lastNonce string
}

// StreamSecrets is the state-of-the-world SDS stream Envoy opens per secret
// name (api_type GRPC).
//
// Its goroutine only waits: for the end of the stream or the server, and
// for changes, which it hands to the pushers. Requests go from recvLoop to
// the pushers too, which decode them, update the stream's state and send
// (see pushers.go).
func (s *Server) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	caller, sub, err := s.subscribeApart(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.metrics.Streams.Inc()
	defer s.metrics.Streams.Dec()

	st := &sotwStream{stream: stream}
	st.init(s, caller, sub)
	defer st.close() // first of the defers: no Send after the handler returns
	go st.recvLoop(ctx, stream, st)

	return st.waitLoop(st)
}

// runPush applies the request recvLoop left, if any, and sends what the
// state calls for.
func (st *sotwStream) runPush() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return
	}
	if req := (&discoveryv3.DiscoveryRequest{}); st.nextRequest(req) {
		st.request(req)
	} else if st.closed {
		return
	}
	if !st.started || st.held() {
		return
	}
	force := st.force
	st.force = false
	if err := st.push(force); err != nil {
		st.fail(err)
	}
}

// request applies a client request to the stream's state. st.mu is held.
func (st *sotwStream) request(req *discoveryv3.DiscoveryRequest) {
	if st.lastNonce != "" && req.GetResponseNonce() != st.lastNonce {
		// Stale: it answers a response that has been superseded, or none
		// although one was sent (every request after a response carries
		// its nonce).
		return
	}
	st.answered()
	if req.GetErrorDetail() != nil {
		// NACK: Envoy keeps what it had. Re-sending the same content
		// would loop; the next real change is the next push.
		st.hold.nack()
		st.s.metrics.NACKs.Inc()
		st.s.logNACK(st.caller, req.GetNode().GetId(), req.GetResourceNames(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage())
	} else {
		st.hold.ack()
	}
	newNames := req.GetResourceNames()
	if !slices.IsSorted(newNames) {
		newNames = slices.Sorted(slices.Values(newNames))
	}
	if st.started && slices.Equal(newNames, st.names) {
		return
	}
	st.started = true
	st.names = slices.Clone(newNames)
	st.sent = make([]string, len(st.names))
	st.force = true
}

// push sends every answerable requested name if any of them differs from
// what was last sent (or force, for new names). st.mu is held.
func (st *sotwStream) push(force bool) error {
	s := st.s
	snap := st.sub.Snapshot()
	ownV, wantsOwn := ownBundle(st.names, snap)
	st.hold.wants.Store(wantsOwn)
	var resources []*anypb.Any
	changed, refused := force, false
	for i, n := range st.names {
		r, ok := resolve(n, snap)
		if !ok {
			s.refused(st.caller, n, st.refusedNames())
			refused = true
			continue
		}
		if st.sent[i] != r.key {
			// Recorded at once: without a Send below nothing differed, and
			// a failed Send ends the stream.
			st.sent[i] = r.key
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
	if err := st.recheck(); err != nil {
		return err
	}
	st.lastNonce = s.next()
	resp := &discoveryv3.DiscoveryResponse{
		VersionInfo: st.lastNonce,
		Resources:   resources,
		TypeUrl:     SecretTypeURL,
		Nonce:       st.lastNonce,
	}
	if refused {
		// What the client holds now: nothing for the names left out.
		for i, n := range st.names {
			if _, ok := resolve(n, snap); !ok {
				st.sent[i] = ""
			}
		}
	}
	st.hold.sent(ownV)
	return st.send(resp, func() error { return st.stream.Send(resp) }, st)
}

// contentVersion is a delta resource version: a digest of the content key,
// stable across streams and reconnects, so initial_resource_versions can
// be honoured.
func contentVersion(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:8])
}

// deltaStream is one DeltaSecrets stream.
type deltaStream struct {
	streamBase
	stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]

	// Guarded by mu:
	first      bool // no request yet
	subscribed map[string]bool
	known      map[string]string // name -> version the client holds
	removed    map[string]bool   // names already reported removed
	lastNonce  string
}

// DeltaSecrets is the incremental SDS stream (api_type DELTA_GRPC). Its
// goroutines work as StreamSecrets' do.
func (s *Server) DeltaSecrets(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	caller, sub, err := s.subscribeApart(ctx)
	if err != nil {
		return err
	}
	defer sub.Close()
	s.metrics.Streams.Inc()
	defer s.metrics.Streams.Dec()

	st := &deltaStream{
		stream:     stream,
		first:      true,
		subscribed: map[string]bool{},
		known:      map[string]string{},
		removed:    map[string]bool{},
	}
	st.init(s, caller, sub)
	defer st.close() // first of the defers: no Send after the handler returns
	go st.recvLoop(ctx, stream, st)

	return st.waitLoop(st)
}

// runPush applies the request recvLoop left, if any, and sends what
// differs: every request is followed by a push (of nothing, if nothing
// differs).
func (st *deltaStream) runPush() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return
	}
	if req := (&discoveryv3.DeltaDiscoveryRequest{}); st.nextRequest(req) {
		st.request(req)
	} else if st.closed {
		return
	}
	if st.first || st.held() {
		return
	}
	if err := st.push(); err != nil {
		st.fail(err)
	}
}

// request applies a client request to the stream's state. st.mu is held.
func (st *deltaStream) request(req *discoveryv3.DeltaDiscoveryRequest) {
	if st.first {
		for n, v := range req.GetInitialResourceVersions() {
			st.known[n] = v
		}
	}
	st.first = false
	stale := req.GetResponseNonce() != "" && req.GetResponseNonce() != st.lastNonce
	if st.lastNonce != "" && req.GetResponseNonce() == st.lastNonce {
		st.answered()
	}
	if req.GetErrorDetail() != nil {
		// Even a stale NACK: the bundle it rejected may be pending still.
		st.hold.nack()
	} else if st.lastNonce != "" && req.GetResponseNonce() == st.lastNonce {
		st.hold.ack()
	}
	if req.GetErrorDetail() != nil && !stale {
		st.s.metrics.NACKs.Inc()
		st.s.logNACK(st.caller, req.GetNode().GetId(), nil, req.GetResponseNonce(), req.GetErrorDetail().GetMessage())
	}
	// Subscription changes count even with a stale nonce.
	for _, n := range req.GetResourceNamesSubscribe() {
		st.subscribed[n] = true
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		delete(st.subscribed, n)
		delete(st.known, n)
		delete(st.removed, n)
	}
}

// push sends what differs from what the client holds. st.mu is held.
func (st *deltaStream) push() error {
	s := st.s
	snap := st.sub.Snapshot()
	resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: SecretTypeURL}
	names := sortedKeys(st.subscribed)
	_, wantsOwn := ownBundle(names, snap)
	st.hold.wants.Store(wantsOwn)
	sendsOwn := false
	for _, n := range names {
		r, ok := resolve(n, snap)
		if !ok {
			s.refused(st.caller, n, st.refusedNames())
			if !st.removed[n] {
				// The protocol's "does not exist": a removal, once.
				resp.RemovedResources = append(resp.RemovedResources, n)
				st.removed[n] = true
				delete(st.known, n)
			}
			continue
		}
		v := contentVersion(r.key)
		if st.known[n] == v {
			continue
		}
		a, err := s.encode(n, r)
		if err != nil {
			return status.Error(codes.Internal, "encode secret")
		}
		resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: n, Version: v, Resource: a})
		if len(snap.Bundles) > 0 && ownBundleName(n, snap.Bundles[0]) {
			sendsOwn = true
		}
		st.known[n] = v
		delete(st.removed, n)
	}
	if len(resp.Resources) == 0 && len(resp.RemovedResources) == 0 {
		return nil
	}
	if err := st.recheck(); err != nil {
		return err
	}
	st.lastNonce = s.next()
	resp.SystemVersionInfo = st.lastNonce
	resp.Nonce = st.lastNonce
	if sendsOwn {
		// Delta responses add to what the client holds: one without the
		// bundle leaves a pending one as it is.
		st.hold.sent(snap.Bundles[0].Version)
	}
	return st.send(resp, func() error { return st.stream.Send(resp) }, st)
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
	if errors.Is(err, identity.ErrRevoked) {
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
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
	if err := s.recheck(caller); err != nil {
		return nil, err
	}
	resp.VersionInfo = contentVersion(fmt.Sprint(keys))
	return resp, nil
}
