package endpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/workload"
)

// Source is what a workload socket serves: every identity a caller holds,
// live (SDS and the Workload API), and JWT-SVIDs signed for it. The server
// is one; a node agent serving from its cache is another.
type Source interface {
	sds.Source
	workload.Source
}

// Defaults of WorkloadOptions.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultIdleTimeout      = 5 * time.Minute
	DefaultDrainTimeout     = 10 * time.Second
)

// WorkloadOptions configure a workload socket.
type WorkloadOptions struct {
	// Socket is the socket's path, made 0666 in a 0755 directory (every
	// local user may connect; callers are told apart by their peer
	// credentials). The directories on the way are checked as ListenUnix
	// does. A relative path is made absolute.
	Socket string
	// Source is what callers are served.
	Source Source
	// Attestors authenticate callers (nil: attest.Builtin()).
	Attestors *attest.Set
	// Logger may be nil.
	Logger *slog.Logger
	// SDSMetrics, Conns and StreamsGauge may be nil (no metrics).
	SDSMetrics   *sds.Metrics
	Conns        *ConnMetrics
	StreamsGauge prometheus.Gauge
	// GRPCOptions are the caller's own options (metrics interceptors),
	// applied before the socket's credentials and timeouts.
	GRPCOptions []grpc.ServerOption
	// MaxConnections and MaxConnectionsPerUID cap the connections held at
	// once, in all and per peer uid; 0 means no cap (callers apply their
	// defaults and FitCaps first).
	MaxConnections       int
	MaxConnectionsPerUID int
	// HandshakeTimeout bounds a new connection's HTTP/2 preface (0: 10 s).
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection without a stream for this long
	// (0: 5 min).
	IdleTimeout time.Duration
	// DrainTimeout bounds how long in-flight RPCs may finish on shutdown
	// (0: 10 s).
	DrainTimeout time.Duration
}

// WorkloadServer serves SDS v3, the SPIFFE Workload API and gRPC health on
// one unix socket, every caller authenticated by the attestor set.
type WorkloadServer struct {
	socket  string
	drain   time.Duration
	log     *slog.Logger
	lis     *Listener
	grpc    *grpc.Server
	sds     *sds.Server
	wl      *workload.Server
	health  *health.Server
	stopped chan struct{} // closed by Close, so a later Serve does not serve
	once    sync.Once     // the drain runs once: a second would remove a successor's socket
}

// ListenWorkload binds the workload socket and registers its services.
// The socket accepts from here on (connections wait in the backlog until
// Serve); health reports SERVING for each service. Call Serve, or Close
// when something else fails before Serve.
func ListenWorkload(opts WorkloadOptions) (*WorkloadServer, error) {
	if opts.Socket == "" {
		return nil, errors.New("workload socket path is required")
	}
	if opts.Source == nil {
		return nil, errors.New("workload socket: no source")
	}
	abs, err := filepath.Abs(opts.Socket)
	if err != nil {
		return nil, fmt.Errorf("workload socket %s: %w", opts.Socket, err)
	}
	att := opts.Attestors
	if att == nil {
		att = attest.Builtin()
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	handshake := cmpOr(opts.HandshakeTimeout, DefaultHandshakeTimeout)
	idle := cmpOr(opts.IdleTimeout, DefaultIdleTimeout)

	raw, err := ListenUnix(abs, PublicSocketPerm, PublicDirPerm)
	if err != nil {
		return nil, fmt.Errorf("workload socket: %w", err)
	}
	if d := Unreachable(abs); d != "" {
		log.Warn("workload socket is not reachable by every local user: a directory above it is not searchable by others", "socket", abs, "directory", d)
	}
	lis := Limit(raw, Limits{Name: "workload", Max: max(opts.MaxConnections, 0), MaxPerUID: max(opts.MaxConnectionsPerUID, 0)}, opts.Conns, log)

	// Idle connections without a stream are closed; an HTTP/2 preface
	// that does not arrive in time too.
	gopts := append(append([]grpc.ServerOption(nil), opts.GRPCOptions...),
		grpc.Creds(Credentials(attest.UnixCredentials())),
		grpc.ConnectionTimeout(handshake),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: idle}),
	)
	w := &WorkloadServer{
		socket:  abs,
		drain:   cmpOr(opts.DrainTimeout, DefaultDrainTimeout),
		log:     log,
		lis:     lis,
		grpc:    grpc.NewServer(gopts...),
		health:  health.NewServer(),
		stopped: make(chan struct{}),
	}
	// The attestors' Caller is re-checked before every send, so a process
	// that exited, or a pid given to another process, is served nothing
	// more.
	w.sds = sds.New(opts.Source, att.Caller, log, opts.SDSMetrics)
	w.sds.Register(w.grpc)
	w.wl = workload.New(opts.Source, att.Caller, log)
	if opts.StreamsGauge != nil {
		w.wl.SetStreamsGauge(opts.StreamsGauge)
	}
	w.wl.Register(w.grpc)
	healthpb.RegisterHealthServer(w.grpc, w.health)
	// SERVING for every service by name, so a probe may name the one it
	// depends on; the socket never claims services it does not serve.
	for name := range w.grpc.GetServiceInfo() {
		w.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	return w, nil
}

// Socket is the socket's absolute path.
func (w *WorkloadServer) Socket() string { return w.socket }

// BundleVersions counts the open streams that carry the caller's own trust
// bundle, SDS (by the version ACKed) and Workload API X.509 watchers (by
// the version last sent) together; the key "" counts those holding none
// yet. A node agent reports it to the server (convergence).
func (w *WorkloadServer) BundleVersions() map[string]int {
	out := w.sds.BundleVersions()
	for v, n := range w.wl.BundleVersions() {
		out[v] += n
	}
	return out
}

// Serve serves until ctx is cancelled or the gRPC server fails, then
// drains (health NOT_SERVING, open streams ended cleanly, in-flight RPCs
// given DrainTimeout) and removes the socket file. It returns nil after a
// cancel, else the serving error.
func (w *WorkloadServer) Serve(ctx context.Context) error {
	select {
	case <-w.stopped:
		return errors.New("workload socket: closed")
	default:
	}
	errc := make(chan error, 1)
	go func() { errc <- w.grpc.Serve(w.lis) }()
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("workload socket: %w", err)
	}
	w.shutdown()
	return err
}

// Close stops a server that is not serving (Serve never called), and
// removes its socket. After Serve has returned it does nothing; it is not
// to be called while Serve runs (cancel Serve's context instead).
func (w *WorkloadServer) Close() {
	select {
	case <-w.stopped:
		return
	default:
		close(w.stopped)
	}
	w.shutdown()
}

func (w *WorkloadServer) shutdown() { w.once.Do(w.drainAll) }

func (w *WorkloadServer) drainAll() {
	w.health.Shutdown()
	// Streams end cleanly first; GracefulStop would wait on them forever.
	w.sds.Shutdown()
	w.wl.Shutdown()
	Drain(w.grpc, w.drain)
	w.lis.Close()
	if err := os.Remove(w.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		w.log.Warn("workload socket not removed", "socket", w.socket, "err", err)
	}
}

// Drain stops g gracefully, letting in-flight RPCs finish for at most
// timeout, then closes what is left.
func Drain(g *grpc.Server, timeout time.Duration) {
	if g == nil {
		return
	}
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		g.Stop()
		<-stopped
	}
}

func cmpOr(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}
