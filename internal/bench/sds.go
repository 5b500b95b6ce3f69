package bench

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/sds"
)

// SDSConfig describes an SDS load: many StreamSecrets streams held open the
// way Envoy holds them (one stream per secret name, every response ACKed),
// or a connect loop of short-lived clients.
type SDSConfig struct {
	// Socket is the server's workload socket.
	Socket string
	// Streams is how many StreamSecrets streams to open and hold.
	Streams int
	// Conns is how many gRPC connections carry them; 0 means one per
	// stream (each Envoy its own process). With Conns < Streams, stream i
	// rides connection i%Conns.
	Conns int
	// Names are the secret names; stream i asks for Names[i%len(Names)].
	// Empty means default and ROOTCA.
	Names []string
	// Duration bounds the run: streams are opened, the push (if any) is
	// measured, and the streams are held until it ends. In connect-loop
	// mode it is how long the clients loop.
	Duration time.Duration
	// Ramp bounds how many streams may be opening (waiting for their
	// first secret) at once; 0 means 200.
	Ramp int
	// Push calls the admin API's PrepareCA once every stream is up and
	// measures how long the bundle streams take to receive and ACK the
	// new bundle.
	Push        bool
	AdminSocket string
	// MetricsURL is the server's /metrics, scraped before the streams
	// open, once all have their first secret, and at the end.
	MetricsURL string
	// ConnectLoop runs Clients goroutines, each looping {connect, open a
	// stream for "default", wait for the first secret, close} for Duration.
	ConnectLoop bool
	Clients     int
	// ConnectRate, if > 0, makes the connect loop open: iterations start on
	// a fixed schedule of ConnectRate per second (taken by the Clients
	// goroutines), and latency runs from each scheduled start, so a slow
	// server shows as latency rather than as a lower rate.
	ConnectRate float64
	// NackEvery k > 0 NACKs every k-th response of each stream (testing
	// the server's NACK path); 0 never NACKs, as a healthy Envoy.
	NackEvery int
	// Progress, if set, is called about once a second with a status line.
	Progress func(line string)
}

// sdsRun holds the state shared by the streams of one run.
type sdsRun struct {
	cfg       SDSConfig
	latencies []time.Duration // by stream; 0 until the first secret
	ready     atomic.Int64
	settled   atomic.Int64 // streams that got a first secret or failed before one
	pushes    atomic.Int64
	nacks     atomic.Int64
	errs      atomic.Int64
	firstErr  atomic.Value // string
	lastReady atomic.Int64 // unix nanos of the latest first secret

	// The push: pushStart (unix nanos) is armed just before PrepareCA;
	// every bundle stream then records its first response after it.
	pushStart atomic.Int64
	pushMu    sync.Mutex
	pushLat   []time.Duration
	pushGrew  int
}

func (r *sdsRun) fail(err error) {
	r.errs.Add(1)
	msg := err.Error()
	if s, ok := status.FromError(err); ok {
		msg = s.Code().String() + ": " + s.Message()
	}
	r.firstErr.CompareAndSwap(nil, msg)
}

// stream drives one StreamSecrets stream as Envoy's GrpcMuxImpl does until
// ctx ends. slot is released once the first secret arrived (or the stream
// failed), admitting the next opener.
func (r *sdsRun) stream(ctx context.Context, c secretv3.SecretDiscoveryServiceClient, i int, node *corev3.Node, slot func()) {
	released := false
	release := func() {
		if !released {
			released = true
			r.settled.Add(1)
			slot()
		}
	}
	defer release()
	name := r.cfg.Names[i%len(r.cfg.Names)]
	t0 := time.Now()
	st, err := c.StreamSecrets(ctx)
	if err != nil {
		if ctx.Err() == nil {
			r.fail(err)
		}
		return
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{name}, TypeUrl: sds.SecretTypeURL}); err != nil {
		if ctx.Err() == nil {
			r.fail(err)
		}
		return
	}
	var (
		n         int
		accepted  string
		firstSize int
		pushSeen  bool
	)
	for {
		resp, err := st.Recv()
		if err != nil {
			if ctx.Err() == nil {
				r.fail(err)
			}
			return
		}
		now := time.Now()
		n++
		size, derr := decodeSecret(resp, name)
		if n == 1 {
			r.latencies[i] = now.Sub(t0)
			r.ready.Add(1)
			r.lastReady.Store(now.UnixNano())
			firstSize = size
			release()
		} else {
			r.pushes.Add(1)
		}
		req := &discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{name}, TypeUrl: sds.SecretTypeURL, ResponseNonce: resp.GetNonce()}
		switch {
		case derr != nil:
			// What Envoy would reject, it NACKs; the bench counts it as an
			// error as well.
			r.fail(derr)
			req.VersionInfo = accepted
			req.ErrorDetail = &statuspb.Status{Code: 13, Message: derr.Error()}
			r.nacks.Add(1)
		case r.cfg.NackEvery > 0 && n%r.cfg.NackEvery == 0:
			req.VersionInfo = accepted
			req.ErrorDetail = &statuspb.Status{Code: 13, Message: "meshid bench: NACK for testing (--nack-every)"}
			r.nacks.Add(1)
		default:
			accepted = resp.GetVersionInfo()
			req.VersionInfo = accepted
		}
		if err := st.Send(req); err != nil {
			if ctx.Err() == nil {
				r.fail(err)
			}
			return
		}
		if ps := r.pushStart.Load(); n > 1 && ps != 0 && !pushSeen && isBundleName(name) {
			pushSeen = true
			d := time.Since(time.Unix(0, ps))
			r.pushMu.Lock()
			r.pushLat = append(r.pushLat, d)
			if size > firstSize {
				r.pushGrew++
			}
			r.pushMu.Unlock()
		}
	}
}

// SDS runs the load and returns its figures.
func SDS(ctx context.Context, cfg SDSConfig) (SDSResult, error) {
	if cfg.Duration <= 0 {
		return SDSResult{}, errors.New("duration must be positive")
	}
	if len(cfg.Names) == 0 {
		cfg.Names = []string{sds.NameDefault, sds.NameRootCA}
	}
	if cfg.Ramp <= 0 {
		cfg.Ramp = 200
	}
	// gRPC reads a relative path in a unix:// target as an authority.
	for _, p := range []*string{&cfg.Socket, &cfg.AdminSocket} {
		if *p != "" {
			abs, err := filepath.Abs(*p)
			if err != nil {
				return SDSResult{}, err
			}
			*p = abs
		}
	}
	if cfg.ConnectLoop {
		return sdsConnectLoop(ctx, cfg)
	}
	if cfg.Streams <= 0 {
		return SDSResult{}, errors.New("streams must be positive")
	}
	if cfg.Conns <= 0 || cfg.Conns > cfg.Streams {
		cfg.Conns = cfg.Streams
	}
	if cfg.Push && cfg.AdminSocket == "" {
		return SDSResult{}, errors.New("push needs the admin socket")
	}
	res := SDSResult{Mode: "streams", Streams: cfg.Streams, Conns: cfg.Conns, Names: cfg.Names}
	start := time.Now()
	deadline := start.Add(cfg.Duration)

	var admin adminv1.AdminServiceClient
	if cfg.Push {
		ac, err := dial(cfg.AdminSocket)
		if err != nil {
			return res, err
		}
		defer ac.Close()
		admin = adminv1.NewAdminServiceClient(ac)
	}
	if cfg.MetricsURL != "" {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics = &SDSMetrics{Before: s}
	}

	conns := make([]*grpc.ClientConn, cfg.Conns)
	clients := make([]secretv3.SecretDiscoveryServiceClient, cfg.Conns)
	nodes := make([]*corev3.Node, cfg.Conns)
	for i := range conns {
		c, err := sdsDial(cfg.Socket)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return res, err
		}
		conns[i], clients[i] = c, secretv3.NewSecretDiscoveryServiceClient(c)
		// One node per connection: a connection stands for one Envoy.
		nodes[i] = envoyNode("meshid-bench-" + strconv.Itoa(i))
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()

	r := &sdsRun{cfg: cfg, latencies: make([]time.Duration, cfg.Streams)}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }()

	progress := func(extra string) {
		if cfg.Progress != nil {
			cfg.Progress(fmt.Sprintf("streams up %d/%d  pushes %d  errors %d%s", r.ready.Load(), cfg.Streams, r.pushes.Load(), r.errs.Load(), extra))
		}
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()

	// Open the streams, at most Ramp of them waiting for a first secret at
	// once, then wait for every first secret (or an error).
	sem := make(chan struct{}, cfg.Ramp)
	opened := 0
	openStart := time.Now()
	expired := false
open:
	for opened < cfg.Streams {
		select {
		case sem <- struct{}{}:
			i := opened
			opened++
			wg.Go(func() { r.stream(sctx, clients[i%cfg.Conns], i, nodes[i%cfg.Conns], func() { <-sem }) })
		case <-tick.C:
			progress("")
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(time.Until(deadline)):
			expired = true
			break open
		}
	}
	for !expired && r.settled.Load() < int64(cfg.Streams) {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-tick.C:
			progress("")
		case <-time.After(5 * time.Millisecond):
			expired = time.Now().After(deadline)
		}
	}
	res.Ready = int(r.ready.Load())
	if lr := r.lastReady.Load(); lr != 0 {
		res.RampElapsed = time.Unix(0, lr).Sub(openStart)
	}
	progress("")
	if res.Metrics != nil {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics.Up = s
		res.Metrics.PerStreamUp = perStream(res.Metrics.Before, s, res.Ready)
	}

	if cfg.Push && !expired && res.Ready > 0 {
		targets := 0
		for i, l := range r.latencies {
			if l > 0 && isBundleName(cfg.Names[i%len(cfg.Names)]) {
				targets++
			}
		}
		if cfg.Progress != nil {
			cfg.Progress(fmt.Sprintf("PrepareCA: pushing a new bundle to %d streams", targets))
		}
		// Only one CA can be prepared at a time: a server left with one by a
		// previous run gets it activated first (that changes no bundle, so
		// it pushes nothing), then the prepare below is the change measured.
		cas, err := admin.ListCAs(ctx, &adminv1.ListCAsRequest{})
		if err != nil {
			return res, fmt.Errorf("ListCAs: %w", err)
		}
		for _, c := range cas.GetCas() {
			if c.GetState() == "prepared" {
				if _, err := admin.ActivateCA(ctx, &adminv1.ActivateCARequest{Force: true}); err != nil {
					return res, fmt.Errorf("ActivateCA (to make room for the measured prepare): %w", err)
				}
			}
		}
		t0 := time.Now()
		r.pushStart.Store(t0.UnixNano())
		_, err = admin.PrepareCA(ctx, &adminv1.PrepareCARequest{})
		pr := &PushResult{PrepareCA: time.Since(t0), Targets: targets}
		if err != nil {
			return res, fmt.Errorf("PrepareCA: %w", err)
		}
		for {
			r.pushMu.Lock()
			got := len(r.pushLat)
			r.pushMu.Unlock()
			if got >= targets || time.Now().After(deadline) {
				break
			}
			select {
			case <-ctx.Done():
				return res, ctx.Err()
			case <-tick.C:
				progress(fmt.Sprintf("  push ACKed %d/%d", got, targets))
			case <-time.After(2 * time.Millisecond):
			}
		}
		r.pushMu.Lock()
		pr.Got = len(r.pushLat)
		pr.Grew = r.pushGrew
		pr.ToACK = summarize(r.pushLat)
		r.pushMu.Unlock()
		res.Push = pr
	}

	// Hold the streams (idle, but still ACKing whatever is pushed) until
	// the duration ends.
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-tick.C:
			progress("  holding")
		case <-time.After(time.Until(deadline)):
		}
	}
	if res.Metrics != nil {
		s, err := scrape(ctx, cfg.MetricsURL)
		if err != nil {
			return res, err
		}
		res.Metrics.End = s
		res.Metrics.PerStreamEnd = perStream(res.Metrics.Before, s, res.Ready)
	}
	stop()
	wg.Wait()

	var got []time.Duration
	for _, l := range r.latencies {
		if l > 0 {
			got = append(got, l)
		}
	}
	res.FirstSecret = summarize(got)
	res.Pushes = r.pushes.Load()
	res.NACKs = r.nacks.Load()
	res.Errors = r.errs.Load()
	if s, ok := r.firstErr.Load().(string); ok {
		res.FirstError = s
	}
	res.Elapsed = time.Since(start)
	return res, nil
}
