package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/endpoint"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/sds"
)

// Endpoints says where a running server listens.
type Endpoints struct {
	// AdminSocket is the admin API's unix socket, made owner-only (0600) in
	// a directory made 0700 if it does not exist.
	AdminSocket string
	// Socket is the workload socket (SDS and the SPIFFE Workload API), open to
	// every local user: callers are told apart by their peer credentials.
	// Empty turns it off.
	Socket string
	// SDSListen is host:port for SDS over TCP with TLS, for proxies on
	// other hosts; callers authenticate with an SVID client certificate or
	// a join token. Empty turns it off.
	SDSListen string
	// SDSRESTListen is host:port for Envoy's REST SDS (HTTPS POST of JSON
	// to /v3/discovery:secrets), same authentication. Empty turns it off.
	SDSRESTListen string
	// ServerDNS are DNS SANs of the server's own certificate on the TCP
	// endpoints (default: localhost).
	ServerDNS []string
	// AgentListen is host:port for the agent API (TLS with the server's
	// SVID; agents then present their node SVIDs). Empty turns it off.
	AgentListen string
	// MetricsListen is host:port for /metrics, /healthz and /readyz; empty
	// turns it off.
	MetricsListen string
	// DrainTimeout bounds how long in-flight RPCs may finish on shutdown.
	DrainTimeout time.Duration

	// MaxConnections caps the connections each of the workload socket,
	// SDSListen and SDSRESTListen holds at once (0: 8192; negative: no
	// cap). The caps are scaled down to fit the open-file limit.
	MaxConnections int
	// MaxConnectionsPerUID caps the workload socket's connections per
	// peer uid (0: 256; negative: no cap).
	MaxConnectionsPerUID int
	// AdminMaxConnections is the admin socket's own cap (0: 64), counted
	// apart from the others so that it always has room for an operator.
	AdminMaxConnections int
	// HandshakeTimeout bounds a new connection's handshake (TLS and the
	// HTTP/2 preface) before it is closed (0: 10 s).
	HandshakeTimeout time.Duration
	// IdleTimeout closes a workload or SDS connection that has had no
	// stream for this long (0: 5 min), and idle REST keep-alives.
	IdleTimeout time.Duration
	// RESTReadTimeout bounds reading one REST SDS request, headers and
	// body (0: 10 s).
	RESTReadTimeout time.Duration
	// AgentKeepalive is how long an agent connection may be silent before
	// the server pings it; an unanswered ping (or data unacknowledged by
	// TCP) for a third of that, at least 1 s, closes it (0: 30 s). A node
	// that vanishes without a reset (power loss, a partition) would
	// otherwise hold its Sync stream, and its vote in the convergence gate,
	// for TCP's retransmission timeout: about 15 minutes.
	AgentKeepalive time.Duration
}

func (ep *Endpoints) defaults() error {
	if ep.DrainTimeout == 0 {
		ep.DrainTimeout = 10 * time.Second
	}
	if ep.MaxConnections == 0 {
		ep.MaxConnections = endpoint.DefaultMaxConnections
	}
	if ep.MaxConnectionsPerUID == 0 {
		ep.MaxConnectionsPerUID = endpoint.DefaultMaxConnectionsPerUID
	}
	if ep.AdminMaxConnections <= 0 {
		ep.AdminMaxConnections = endpoint.DefaultAdminMaxConnections
	}
	if ep.HandshakeTimeout <= 0 {
		ep.HandshakeTimeout = 10 * time.Second
	}
	if ep.IdleTimeout <= 0 {
		ep.IdleTimeout = 5 * time.Minute
	}
	if ep.RESTReadTimeout <= 0 {
		ep.RESTReadTimeout = 10 * time.Second
	}
	if ep.AgentKeepalive <= 0 {
		ep.AgentKeepalive = 30 * time.Second
	}
	// gRPC reads a relative path in a unix:// target as an authority, and
	// the sockets are removed on exit, whatever the working directory is.
	for _, p := range []*string{&ep.AdminSocket, &ep.Socket} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return fmt.Errorf("socket %s: %w", *p, err)
		}
		*p = abs
	}
	return nil
}

// connCaps returns the caps of the workload, SDS TCP and REST listeners,
// fitted under the open-file limit beside the admin cap.
func (s *Server) connCaps(ep Endpoints) (workload, sdsTCP, rest int) {
	limit := func(n int) int { return max(n, 0) } // negative: no cap
	caps := []int{limit(ep.MaxConnections), limit(ep.MaxConnections), limit(ep.MaxConnections)}
	var on []int
	for i, enabled := range []bool{ep.Socket != "", ep.SDSListen != "", ep.SDSRESTListen != ""} {
		if enabled {
			on = append(on, i)
		}
	}
	want := make([]int, len(on))
	for j, i := range on {
		want[j] = caps[i]
	}
	nofile := endpoint.FileLimit()
	got, scaled := endpoint.FitCaps(nofile, endpoint.FDReserve, ep.AdminMaxConnections, want)
	if scaled {
		s.log.Warn("connection caps lowered to fit the open-file limit; raise it (ulimit -n, LimitNOFILE=) for more", "nofile", nofile, "max_connections", ep.MaxConnections, "caps", got)
	}
	for j, i := range on {
		caps[i] = got[j]
	}
	return caps[0], caps[1], caps[2]
}

// Listening is reported once every endpoint accepts connections.
type Listening struct {
	AdminSocket string
	Socket      string
	SDSAddr     string
	SDSRESTAddr string
	AgentAddr   string
	MetricsAddr string // the bound address, useful when the port was 0
}

// Run serves the admin API (and metrics) until ctx is cancelled, then
// drains in-flight requests and returns nil. ready, if not nil, is called
// once everything listens.
func (s *Server) Run(ctx context.Context, ep Endpoints, ready func(Listening)) error {
	if ep.AdminSocket == "" {
		return errors.New("admin socket path is required")
	}
	if err := ep.defaults(); err != nil {
		return err
	}
	wlCap, sdsCap, restCap := s.connCaps(ep)
	perUID := max(ep.MaxConnectionsPerUID, 0)
	// Idle connections without a stream are closed; a handshake (and the
	// HTTP/2 preface) that does not finish in time too.
	connOpts := []grpc.ServerOption{
		grpc.ConnectionTimeout(ep.HandshakeTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: ep.IdleTimeout}),
	}
	adminRaw, err := endpoint.ListenUnix(ep.AdminSocket, endpoint.AdminSocketPerm, endpoint.AdminDirPerm)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	defer os.Remove(ep.AdminSocket)
	adminLis := endpoint.Limit(adminRaw, endpoint.Limits{Name: "admin", Max: ep.AdminMaxConnections}, s.metrics.Conns, s.log)

	gs := grpc.NewServer(append(s.grpcMetrics.options(), grpc.Creds(endpoint.Credentials(attest.UnixCredentials())), grpc.ConnectionTimeout(ep.HandshakeTimeout))...)
	adminv1.RegisterAdminServiceServer(gs, NewAdminService(s))
	var hs healths
	hs.register(gs)
	reflection.Register(gs) // admin socket only: operators may list the API, workloads need not

	errc := make(chan error, 8) // one per server goroutine, so none blocks after Run returns
	go func() { errc <- gs.Serve(adminLis) }()

	got := Listening{AdminSocket: ep.AdminSocket}
	var wl *endpoint.WorkloadServer
	if ep.Socket != "" {
		wl, err = endpoint.ListenWorkload(endpoint.WorkloadOptions{
			Socket:               ep.Socket,
			Source:               s,
			Attestors:            attestors,
			Logger:               s.log,
			SDSMetrics:           s.sdsMetrics,
			Conns:                s.metrics.Conns,
			StreamsGauge:         s.metrics.WorkloadStreams,
			GRPCOptions:          s.grpcMetrics.options(),
			MaxConnections:       wlCap,
			MaxConnectionsPerUID: perUID,
			HandshakeTimeout:     ep.HandshakeTimeout,
			IdleTimeout:          ep.IdleTimeout,
			DrainTimeout:         ep.DrainTimeout,
		})
		if err != nil {
			gs.Stop()
			return err
		}
		got.Socket = wl.Socket()
	}
	// fail undoes what listens so far when a later endpoint cannot.
	fail := func(err error, servers ...*grpc.Server) error {
		stopAll(append(servers, gs)...)
		if wl != nil {
			wl.Close()
		}
		return err
	}

	var remote, agentSrv *grpc.Server
	var agentSvc *AgentService
	var remoteSDS *sds.Server
	var restSrv *http.Server
	if ep.SDSListen != "" || ep.SDSRESTListen != "" || ep.AgentListen != "" {
		dns := ep.ServerDNS
		if len(dns) == 0 {
			dns = []string{"localhost"}
		}
		st, err := s.newServerTLS(ctx, dns)
		if err != nil {
			return fail(err)
		}
		defer st.close()
		remoteSDS = sds.New(s, s.grpcRemoteCaller, s.log, s.sdsMetrics)
		if ep.SDSListen != "" {
			tl, err := net.Listen("tcp", ep.SDSListen)
			if err != nil {
				return fail(fmt.Errorf("sds listen %s: %w", ep.SDSListen, err))
			}
			got.SDSAddr = tl.Addr().String()
			l := endpoint.Limit(tl, endpoint.Limits{Name: "sds_tcp", Max: sdsCap}, s.metrics.Conns, s.log)
			remote = grpc.NewServer(append(append(s.grpcMetrics.options(), connOpts...), grpc.Creds(credentials.NewTLS(st.config("h2"))))...)
			remoteSDS.Register(remote)
			hs.register(remote)
			go func() { errc <- remote.Serve(l) }()
		}
		if ep.AgentListen != "" {
			tl, err := net.Listen("tcp", ep.AgentListen)
			if err != nil {
				return fail(fmt.Errorf("agent listen %s: %w", ep.AgentListen, err), remote)
			}
			got.AgentAddr = tl.Addr().String()
			l := endpoint.Limit(tl, endpoint.Limits{Name: "agent", Max: sdsCap}, s.metrics.Conns, s.log)
			// No idle timeout: an agent's one Sync stream is open for
			// as long as it runs.
			agentSrv = grpc.NewServer(append(append(s.grpcMetrics.options(), grpc.ConnectionTimeout(ep.HandshakeTimeout)),
				agentConnOptions(st, ep.AgentKeepalive)...)...)
			agentSvc = NewAgentService(s)
			agentv1.RegisterAgentServiceServer(agentSrv, agentSvc)
			hs.register(agentSrv)
			go func() { errc <- agentSrv.Serve(l) }()
		}
		if ep.SDSRESTListen != "" {
			tl, err := net.Listen("tcp", ep.SDSRESTListen)
			if err != nil {
				return fail(fmt.Errorf("sds rest listen %s: %w", ep.SDSRESTListen, err), remote, agentSrv)
			}
			got.SDSRESTAddr = tl.Addr().String()
			l := endpoint.Limit(tl, endpoint.Limits{Name: "sds_rest", Max: restCap}, s.metrics.Conns, s.log)
			// A client that sends its request slowly, or keeps an idle
			// connection, must not hold a connection (and a goroutine)
			// forever; the header timeout also bounds the TLS handshake.
			restSrv = &http.Server{
				Handler:           remoteSDS.HTTPHandler(s.httpRemoteCaller),
				ReadHeaderTimeout: min(5*time.Second, ep.RESTReadTimeout),
				ReadTimeout:       ep.RESTReadTimeout,
				IdleTimeout:       ep.IdleTimeout,
				TLSConfig:         st.config("h2", "http/1.1"),
			}
			go func() {
				if err := restSrv.ServeTLS(l, "", ""); !errors.Is(err, http.ErrServerClosed) {
					errc <- err
				}
			}()
		}
	}

	var httpSrv *http.Server
	if ep.MetricsListen != "" {
		ml, err := net.Listen("tcp", ep.MetricsListen)
		if err != nil {
			if restSrv != nil {
				restSrv.Close()
			}
			return fail(fmt.Errorf("metrics listen %s: %w", ep.MetricsListen, err), remote, agentSrv)
		}
		got.MetricsAddr = ml.Addr().String()
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{Registry: s.metrics.Registry}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if !s.ready.Load() {
				http.Error(w, "not ready: starting or draining", http.StatusServiceUnavailable)
				return
			}
			if err := s.store.Health(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ready")
		})
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := httpSrv.Serve(ml); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	// The workload socket drains on its own context, cancelled by Run
	// once it starts the drain, so that readiness and the admin health
	// turn first, as for every other endpoint.
	wlCtx, wlCancel := context.WithCancel(context.Background())
	defer wlCancel()
	var wlDone chan error // nil without a workload socket: never ready in the select
	if wl != nil {
		wlDone = make(chan error, 1)
		go func() { wlDone <- wl.Serve(wlCtx) }()
	}
	s.log.Info("serving", "admin_socket", ep.AdminSocket, "socket", got.Socket, "sds_tcp", got.SDSAddr, "sds_rest", got.SDSRESTAddr, "agent_api", got.AgentAddr, "metrics", got.MetricsAddr, "trust_domain", s.td.String())
	hs.serving()
	s.ready.Store(true)
	s.announce(ctx, got)
	if ready != nil {
		ready(got)
	}

	var runErr error
	wlReturned := false
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	case runErr = <-wlDone:
		wlReturned = true
	}
	s.ready.Store(false)
	s.log.Info("shutting down: draining in-flight requests")
	hs.shutdown()
	wlCancel()
	if remoteSDS != nil {
		remoteSDS.Shutdown() // streams end cleanly; GracefulStop would wait on them forever
	}
	if agentSvc != nil {
		agentSvc.Shutdown() // Sync streams end: agents reconnect, to another replica if there is one
	}
	for _, g := range []*grpc.Server{gs, remote, agentSrv} {
		endpoint.Drain(g, ep.DrainTimeout)
	}
	for _, h := range []*http.Server{httpSrv, restSrv} {
		if h != nil {
			sctx, cancel := context.WithTimeout(context.Background(), ep.DrainTimeout)
			_ = h.Shutdown(sctx)
			cancel()
		}
	}
	if wl != nil && !wlReturned {
		if err := <-wlDone; err != nil && runErr == nil {
			runErr = err
		}
	}
	return runErr
}

func stopAll(servers ...*grpc.Server) {
	for _, g := range servers {
		if g != nil {
			g.Stop()
		}
	}
}

// ListenUnix listens on a unix socket with the given permissions; see
// endpoint.ListenUnix for the checks of the directories on the way.
func ListenUnix(path string, perm, dirPerm os.FileMode) (net.Listener, error) {
	l, err := endpoint.ListenUnix(path, perm, dirPerm)
	if err != nil {
		return nil, err
	}
	return l, nil
}
