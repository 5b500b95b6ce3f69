package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
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

// Latency summarises a set of durations.
type Latency struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P99   time.Duration `json:"p99_ns"`
	Max   time.Duration `json:"max_ns"`
}

func summarize(d []time.Duration) Latency {
	if len(d) == 0 {
		return Latency{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return Latency{Count: len(s), P50: s[len(s)/2], P99: s[min(len(s)*99/100, len(s)-1)], Max: s[len(s)-1]}
}

// ServerSample is one scrape of the server's process metrics.
type ServerSample struct {
	RSSBytes       float64 `json:"rss_bytes"`
	HeapInuseBytes float64 `json:"heap_inuse_bytes"`
	StackInuse     float64 `json:"stack_inuse_bytes"`
	Goroutines     float64 `json:"goroutines"`
	SDSStreams     float64 `json:"sds_streams"`
}

// PerStream is the growth between two samples divided by the streams.
type PerStream struct {
	RSSBytes       float64 `json:"rss_bytes"`
	HeapInuseBytes float64 `json:"heap_inuse_bytes"`
	StackInuse     float64 `json:"stack_inuse_bytes"`
	Goroutines     float64 `json:"goroutines"`
}

func perStream(before, after ServerSample, n int) PerStream {
	if n <= 0 {
		return PerStream{}
	}
	f := float64(n)
	return PerStream{
		RSSBytes:       (after.RSSBytes - before.RSSBytes) / f,
		HeapInuseBytes: (after.HeapInuseBytes - before.HeapInuseBytes) / f,
		StackInuse:     (after.StackInuse - before.StackInuse) / f,
		Goroutines:     (after.Goroutines - before.Goroutines) / f,
	}
}

// SDSMetrics are the server's figures around the load.
type SDSMetrics struct {
	Before ServerSample `json:"before"`
	// Up is scraped as soon as every stream has its first secret; End just
	// before the streams close, after being held idle for the rest of the
	// duration.
	Up           ServerSample `json:"up"`
	End          ServerSample `json:"end"`
	PerStreamUp  PerStream    `json:"per_stream_up"`
	PerStreamEnd PerStream    `json:"per_stream_end"`
}

// PushResult is what the bundle push measured.
type PushResult struct {
	// PrepareCA is the admin call's own latency (key generation and the
	// store write included); every stream figure counts from its start.
	PrepareCA time.Duration `json:"prepare_ca_ns"`
	// Targets are the bundle streams that were up when the call was made;
	// Got how many of them received and ACKed a new bundle.
	Targets int `json:"targets"`
	Got     int `json:"got"`
	// Grew is how many of the new bundles held more certificates than the
	// stream's first one.
	Grew int `json:"grew"`
	// ToACK is from the PrepareCA call to the ACK of the new bundle having
	// been written.
	ToACK Latency `json:"to_ack"`
}

// LoopResult is what a connect loop measured.
type LoopResult struct {
	Clients    int `json:"clients"`
	Iterations int `json:"iterations"`
	// Unfinished iterations were still waiting for their first secret when
	// the duration ended (all of them, if the caller is entitled to none).
	Unfinished int     `json:"unfinished"`
	PerSecond  float64 `json:"per_second"`
	Latency    Latency `json:"connect_to_first_secret"`
}

// SDSResult is what an SDS load measured.
type SDSResult struct {
	Mode    string   `json:"mode"` // "streams" or "connect-loop"
	Streams int      `json:"streams,omitempty"`
	Conns   int      `json:"conns,omitempty"`
	Names   []string `json:"names,omitempty"`
	// Ready streams received their first secret; FirstSecret is the time
	// from opening each stream to that response.
	Ready       int           `json:"ready"`
	FirstSecret Latency       `json:"connect_to_first_secret"`
	RampElapsed time.Duration `json:"ramp_elapsed_ns"` // first open to last first secret
	// Pushes are responses after a stream's first; NACKs what the bench
	// rejected on purpose (NackEvery).
	Pushes     int64         `json:"pushes"`
	NACKs      int64         `json:"nacks"`
	Errors     int64         `json:"errors"`
	FirstError string        `json:"first_error,omitempty"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	Metrics    *SDSMetrics   `json:"metrics,omitempty"`
	Push       *PushResult   `json:"push,omitempty"`
	Loop       *LoopResult   `json:"connect_loop,omitempty"`
}

// sdsDial opens a gRPC client connection to the workload socket. The
// client side shares its write buffers and keeps small read buffers so
// that ten thousand connections in the load process stay cheap; the
// server's own settings are untouched.
func sdsDial(path string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(4096),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
}

// envoyNode is what Envoy puts in the node field of every request.
func envoyNode(id string) *corev3.Node {
	return &corev3.Node{
		Id:                   id,
		Cluster:              "meshid-bench",
		UserAgentName:        "envoy",
		UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: "1.36.0"},
	}
}

// isBundleName reports whether name is served as a trust bundle (and so
// changes when a CA is prepared).
func isBundleName(name string) bool {
	switch name {
	case sds.NameRootCA, sds.NameAll:
		return true
	case sds.NameDefault:
		return false
	}
	rest, ok := strings.CutPrefix(name, "spiffe://")
	return ok && !strings.Contains(rest, "/")
}

var pemCertHeader = []byte("-----BEGIN CERTIFICATE-----")

// certCount counts the certificates a secret carries (SVID chain or
// bundle), and checks it is the one asked for.
func decodeSecret(r *discoveryv3.DiscoveryResponse, want string) (int, error) {
	if r.GetTypeUrl() != sds.SecretTypeURL {
		return 0, fmt.Errorf("response type_url %q", r.GetTypeUrl())
	}
	if r.GetNonce() == "" || r.GetVersionInfo() == "" {
		return 0, errors.New("response without nonce or version_info")
	}
	if len(r.GetResources()) != 1 {
		return 0, fmt.Errorf("%d resources for one name", len(r.GetResources()))
	}
	var s tlsv3.Secret
	if err := r.GetResources()[0].UnmarshalTo(&s); err != nil {
		return 0, fmt.Errorf("decode secret: %w", err)
	}
	if s.GetName() != want {
		return 0, fmt.Errorf("secret %q on the stream for %q", s.GetName(), want)
	}
	switch t := s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		return bytes.Count(t.TlsCertificate.GetCertificateChain().GetInlineBytes(), pemCertHeader), nil
	case *tlsv3.Secret_ValidationContext:
		vc := t.ValidationContext
		if ca := vc.GetTrustedCa(); ca != nil {
			return bytes.Count(ca.GetInlineBytes(), pemCertHeader), nil
		}
		if tc := vc.GetCustomValidatorConfig().GetTypedConfig(); tc != nil {
			return len(tc.GetValue()), nil // SPIFFE validator: size stands in for content
		}
	}
	return 0, nil
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

// sdsConnectLoop runs cfg.Clients goroutines, each looping {new
// connection, StreamSecrets for "default", first secret, close} until the
// duration ends.
func sdsConnectLoop(ctx context.Context, cfg SDSConfig) (SDSResult, error) {
	if cfg.Clients <= 0 {
		return SDSResult{}, errors.New("clients must be positive")
	}
	res := SDSResult{Mode: "connect-loop", Names: []string{sds.NameDefault}}
	r := &sdsRun{cfg: cfg}
	r.cfg.Names = []string{sds.NameDefault}
	lctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()

	var (
		mu         sync.Mutex
		all        []time.Duration
		iters      atomic.Int64
		unfinished atomic.Int64
		wg         sync.WaitGroup
	)
	start := time.Now()
	// Open loop: a schedule of start times, taken by the clients.
	var schedule chan time.Time
	if cfg.ConnectRate > 0 {
		schedule = make(chan time.Time, 1<<16)
		wg.Go(func() {
			defer close(schedule)
			interval := time.Duration(float64(time.Second) / cfg.ConnectRate)
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				select {
				case <-lctx.Done():
					return
				case at := <-t.C:
					select {
					case schedule <- at:
					default: // the clients are that far behind: counted as missed
						unfinished.Add(1)
					}
				}
			}
		})
	}
	for c := range cfg.Clients {
		wg.Go(func() {
			node := envoyNode("meshid-bench-loop-" + strconv.Itoa(c))
			var mine []time.Duration
			defer func() {
				mu.Lock()
				all = append(all, mine...)
				mu.Unlock()
			}()
			for lctx.Err() == nil {
				var scheduled time.Time
				if schedule != nil {
					at, ok := <-schedule
					if !ok {
						return
					}
					scheduled = at
				}
				d, err := connectOnce(lctx, cfg.Socket, node)
				if err == nil && !scheduled.IsZero() {
					d = time.Since(scheduled)
				}
				if err != nil {
					// The run's deadline travels to the server as
					// grpc-timeout, which can end the call a moment before
					// our own context reports it: both mean "cut off".
					if lctx.Err() != nil || status.Code(err) == codes.DeadlineExceeded {
						unfinished.Add(1)
					} else {
						r.fail(err)
						select { // do not spin on a dead socket
						case <-lctx.Done():
						case <-time.After(10 * time.Millisecond):
						}
					}
					continue
				}
				mine = append(mine, d)
				iters.Add(1)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case <-done:
			waiting = false
		case <-tick.C:
			if cfg.Progress != nil {
				cfg.Progress(fmt.Sprintf("connect loop: %d first secrets  errors %d", iters.Load(), r.errs.Load()))
			}
		}
	}
	res.Elapsed = time.Since(start)
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.Ready = len(all)
	res.FirstSecret = summarize(all)
	res.Errors = r.errs.Load()
	if s, ok := r.firstErr.Load().(string); ok {
		res.FirstError = s
	}
	res.Loop = &LoopResult{Clients: cfg.Clients, Iterations: len(all), Unfinished: int(unfinished.Load()), PerSecond: float64(len(all)) / res.Elapsed.Seconds(), Latency: res.FirstSecret}
	return res, nil
}

// connectOnce is one connect-loop iteration; the clock runs from before
// the connection is made to the first response.
func connectOnce(ctx context.Context, socket string, node *corev3.Node) (time.Duration, error) {
	t0 := time.Now()
	conn, err := sdsDial(socket)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(sctx)
	if err != nil {
		return 0, err
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{sds.NameDefault}, TypeUrl: sds.SecretTypeURL}); err != nil {
		return 0, err
	}
	resp, err := st.Recv()
	if err != nil {
		return 0, err
	}
	d := time.Since(t0)
	if _, err := decodeSecret(resp, sds.NameDefault); err != nil {
		return 0, err
	}
	return d, nil
}

// scrape reads the process figures from a Prometheus text exposition.
func scrape(ctx context.Context, url string) (ServerSample, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return ServerSample{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ServerSample{}, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ServerSample{}, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	want := map[string]*float64{}
	var s ServerSample
	want["process_resident_memory_bytes"] = &s.RSSBytes
	want["go_memstats_heap_inuse_bytes"] = &s.HeapInuseBytes
	want["go_goroutines"] = &s.Goroutines
	want["go_memstats_stack_inuse_bytes"] = &s.StackInuse
	want["meshid_sds_streams"] = &s.SDSStreams
	found := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		if p, ok := want[name]; ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
			if err != nil {
				return s, fmt.Errorf("scrape %s: %s: %w", url, name, err)
			}
			*p = v
			found++
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("scrape %s: %w", url, err)
	}
	if found < 3 {
		return s, fmt.Errorf("scrape %s: process_resident_memory_bytes, go_goroutines or go_memstats_heap_inuse_bytes missing", url)
	}
	return s, nil
}
