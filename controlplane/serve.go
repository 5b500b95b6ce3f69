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
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/identity"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/workload"
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
	// MetricsListen is host:port for /metrics, /healthz and /readyz; empty
	// turns it off.
	MetricsListen string
	// DrainTimeout bounds how long in-flight RPCs may finish on shutdown.
	DrainTimeout time.Duration
}

// Listening is reported once every endpoint accepts connections.
type Listening struct {
	AdminSocket string
	Socket      string
	SDSAddr     string
	SDSRESTAddr string
	MetricsAddr string // the bound address, useful when the port was 0
}

// Run serves the admin API (and metrics) until ctx is cancelled, then
// drains in-flight requests and returns nil. ready, if not nil, is called
// once everything listens.
func (s *Server) Run(ctx context.Context, ep Endpoints, ready func(Listening)) error {
	if ep.AdminSocket == "" {
		return errors.New("admin socket path is required")
	}
	if ep.DrainTimeout == 0 {
		ep.DrainTimeout = 10 * time.Second
	}
	adminLis, err := ListenUnix(ep.AdminSocket, 0o600, 0o700)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	defer os.Remove(ep.AdminSocket)

	gs := grpc.NewServer(append(s.grpcMetrics.options(), grpc.Creds(attest.UnixCredentials()))...)
	adminv1.RegisterAdminServiceServer(gs, NewAdminService(s))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs) // admin socket only: operators may list the API, workloads need not

	errc := make(chan error, 8) // one per server goroutine, so none blocks after Run returns
	go func() { errc <- gs.Serve(adminLis) }()

	got := Listening{AdminSocket: ep.AdminSocket}
	var ws *grpc.Server
	var sdsSrv *sds.Server
	var wlSrv *workload.Server
	if ep.Socket != "" {
		wl, err := ListenUnix(ep.Socket, 0o666, 0o755)
		if err != nil {
			gs.Stop()
			return fmt.Errorf("workload socket: %w", err)
		}
		defer os.Remove(ep.Socket)
		got.Socket = ep.Socket
		ws = grpc.NewServer(append(s.grpcMetrics.options(), grpc.Creds(attest.UnixCredentials()))...)
		sdsSrv = sds.New(s, unixCaller, s.log, s.sdsMetrics)
		sdsSrv.Register(ws)
		wlSrv = workload.New(s, unixCaller, s.log)
		wlSrv.SetStreamsGauge(s.metrics.WorkloadStreams)
		wlSrv.Register(ws)
		healthpb.RegisterHealthServer(ws, hs)
		go func() { errc <- ws.Serve(wl) }()
	}

	var remote *grpc.Server
	var remoteSDS *sds.Server
	var restSrv *http.Server
	if ep.SDSListen != "" || ep.SDSRESTListen != "" {
		dns := ep.ServerDNS
		if len(dns) == 0 {
			dns = []string{"localhost"}
		}
		st, err := s.newServerTLS(ctx, dns)
		if err != nil {
			stopAll(gs, ws)
			return err
		}
		defer st.close()
		remoteSDS = sds.New(s, s.grpcRemoteCaller, s.log, s.sdsMetrics)
		if ep.SDSListen != "" {
			l, err := net.Listen("tcp", ep.SDSListen)
			if err != nil {
				stopAll(gs, ws)
				return fmt.Errorf("sds listen %s: %w", ep.SDSListen, err)
			}
			got.SDSAddr = l.Addr().String()
			remote = grpc.NewServer(append(s.grpcMetrics.options(), grpc.Creds(credentials.NewTLS(st.config("h2"))))...)
			remoteSDS.Register(remote)
			healthpb.RegisterHealthServer(remote, hs)
			go func() { errc <- remote.Serve(l) }()
		}
		if ep.SDSRESTListen != "" {
			l, err := net.Listen("tcp", ep.SDSRESTListen)
			if err != nil {
				stopAll(gs, ws, remote)
				return fmt.Errorf("sds rest listen %s: %w", ep.SDSRESTListen, err)
			}
			got.SDSRESTAddr = l.Addr().String()
			restSrv = &http.Server{Handler: remoteSDS.HTTPHandler(s.httpRemoteCaller), ReadHeaderTimeout: 5 * time.Second, TLSConfig: st.config("h2", "http/1.1")}
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
			stopAll(gs, ws, remote)
			return fmt.Errorf("metrics listen %s: %w", ep.MetricsListen, err)
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
			fmt.Fprintln(w, "ready")
		})
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := httpSrv.Serve(ml); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	s.log.Info("serving", "admin_socket", ep.AdminSocket, "socket", got.Socket, "sds_tcp", got.SDSAddr, "sds_rest", got.SDSRESTAddr, "metrics", got.MetricsAddr, "trust_domain", s.td.String())
	markServing(hs, gs, ws, remote)
	s.ready.Store(true)
	if ready != nil {
		ready(got)
	}

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	s.ready.Store(false)
	s.log.Info("shutting down: draining in-flight requests")
	hs.Shutdown()
	for _, x := range []*sds.Server{sdsSrv, remoteSDS} {
		if x != nil {
			x.Shutdown() // streams end cleanly; GracefulStop would wait on them forever
		}
	}
	if wlSrv != nil {
		wlSrv.Shutdown()
	}
	for _, g := range []*grpc.Server{gs, ws, remote} {
		if g == nil {
			continue
		}
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(ep.DrainTimeout):
			g.Stop()
			<-stopped
		}
	}
	for _, h := range []*http.Server{httpSrv, restSrv} {
		if h != nil {
			sctx, cancel := context.WithTimeout(context.Background(), ep.DrainTimeout)
			_ = h.Shutdown(sctx)
			cancel()
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

// unixCaller identifies a workload-socket caller by its kernel-verified
// peer credentials.
func unixCaller(ctx context.Context) (identity.Caller, error) {
	pc, err := attest.PeerCredFromContext(ctx)
	if err != nil {
		return identity.Caller{}, err
	}
	return identity.Caller{Selectors: pc.Selectors(), Label: pc.String()}, nil
}

// ListenUnix listens on a unix socket with the given permissions. The
// socket is bound under a temporary name and renamed into place after its
// mode is set, so there is no moment when it is reachable with looser
// permissions. A live socket at path (another server) is an error; a stale
// one is replaced.
func ListenUnix(path string, perm, dirPerm os.FileMode) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, dirPerm); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another running server", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	_ = os.Remove(tmp)
	lis, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	// The listener must not unlink tmp on Close: after the rename that name
	// no longer exists and path is removed by the caller.
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, perm); err != nil {
		lis.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		lis.Close()
		os.Remove(tmp)
		return nil, err
	}
	return lis, nil
}

// Default socket paths, the same layout as SPIRE's: the admin socket in a
// private (0700) directory, the workload socket in a public one.
const (
	DefaultAdminSocket = "/tmp/meshid/private/admin.sock"
	DefaultSocket      = "/tmp/meshid/public/workload.sock"
)
