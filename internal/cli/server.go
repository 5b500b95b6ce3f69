package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/store"
)

type serverFlags struct {
	dataDir        string
	trustDomain    string
	adminSocket    string
	socket         string
	svidTTL        time.Duration
	caTTL          time.Duration
	caKeyType      string
	kekFile        string
	logLevel       string
	logFormat      string
	metricsListen  string
	prepareAt      float64
	activateAt     float64
	prepareWindow  time.Duration
	rotateOnAct    bool
	jwtTTL         time.Duration
	upCert, upKey  string
	retention      time.Duration
	signRate       float64
	signConc       int
	sdsListen      string
	sdsREST        string
	agentListen    string
	agentKeepalive time.Duration
	serverDNS      []string
	maxConns       int
	maxConnsUID    int
	crlValidity    time.Duration
	maxCRLSerials  int
	fastSign       bool
	minConv        float64
	agentSignRate  float64
	kube           serverKubeFlags
	pcr            serverPCRFlags
	st             serverStoreFlags
}

func defaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/meshid"
	}
	if d, err := os.UserHomeDir(); err == nil {
		return filepath.Join(d, ".local", "share", "meshid")
	}
	return ".meshid"
}

func (f *serverFlags) register(cmd *cobra.Command, dataDirDefault, dataDirHelp string) {
	fs := cmd.Flags()
	fs.String("config", "", "YAML file of settings, keyed by flag name (flags and MESHID_* variables win)")
	fs.StringVar(&f.dataDir, "data-dir", dataDirDefault, dataDirHelp)
	fs.StringVar(&f.trustDomain, "trust-domain", controlplane.DefaultTrustDomain, "SPIFFE trust domain this server is the authority for")
	fs.StringVar(&f.adminSocket, "admin-socket", endpoint.DefaultLayout().AdminSocket, "unix socket of the admin API, made 0600 in a 0700 directory (whoever can open it is an administrator); default under /run/meshid as root, else $XDG_RUNTIME_DIR/meshid or /tmp/meshid-<uid>")
	fs.StringVar(&f.socket, "socket", endpoint.DefaultLayout().Socket, "workload socket for SDS and the SPIFFE Workload API, made 0666 in a 0755 directory (open to every local user); existing directories on either path must be owned by root or this user and not writable by others")
	durationFlag(fs, &f.svidTTL, "svid-ttl", controlplane.DefaultSVIDTTL, "lifetime of issued X.509-SVIDs (e.g. 1h, 24h)")
	durationFlag(fs, &f.caTTL, "ca-ttl", controlplane.DefaultCATTL, "lifetime of the CA made on first start (e.g. 365d)")
	fs.StringVar(&f.caKeyType, "ca-key-type", string(controlplane.DefaultCAKeyType), "key type of a new CA: ec-p256, ec-p384 or rsa-3072")
	fs.Float64Var(&f.prepareAt, "ca-prepare-at", 0.5, "fraction of the active CA's life at which its successor is prepared (published in the bundle)")
	fs.Float64Var(&f.activateAt, "ca-activate-at", 2.0/3, "fraction of the active CA's life at which its successor is activated (signs)")
	durationFlag(fs, &f.prepareWindow, "ca-prepare-window", 0, "least time a prepared CA is in the bundle before it signs (default 2 x --svid-ttl, never less than --svid-ttl)")
	fs.Float64Var(&f.minConv, "ca-activate-min-convergence", 1, "fraction of the connected agents' bundle-carrying streams that must hold the prepared CA before it is activated automatically (see meshid status); 0 turns the gate off")
	fs.BoolVar(&f.rotateOnAct, "rotate-svids-on-activation", false, "re-issue every served SVID as soon as a new CA is activated")
	durationFlag(fs, &f.jwtTTL, "jwt-ttl", 5*time.Minute, "lifetime of JWT-SVIDs")
	durationFlag(fs, &f.retention, "inventory-retention", 7*24*time.Hour, "how long expired SVIDs stay in the inventory before they are pruned")
	fs.Float64Var(&f.signRate, "sign-rate", 0, "most X.509-SVID signatures per second, spreading mass re-issues (0: no limit)")
	fs.IntVar(&f.signConc, "sign-concurrency", 0, "most signatures in flight (default 4 x CPUs); excess requests queue briefly, then get ResourceExhausted")
	fs.StringVar(&f.upCert, "upstream-ca-cert", "", "PEM certificate of an existing CA (optionally followed by its chain to the root) that signs meshid's CA as an intermediate; the bundle is then that root")
	fs.StringVar(&f.upKey, "upstream-ca-key", "", "PEM private key of --upstream-ca-cert")
	fs.StringVar(&f.kekFile, "kek-file", "", "key-encryption key for CA keys at rest (default <data-dir>/kek; made 0600 if absent)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	logFormatFlag(fs, &f.logFormat)
	fs.StringVar(&f.sdsListen, "sds-listen", "", "host:port for SDS over TCP+TLS for remote proxies (SVID client certificate or join token); off when empty")
	fs.StringVar(&f.agentListen, "agent-listen", "", "host:port for the agent API (node agents: meshid agent), TLS with the server's SVID; off when empty")
	durationFlag(fs, &f.agentKeepalive, "agent-keepalive", 30*time.Second, "ping an agent connection silent this long and drop it when a third of it (at least 1 s) passes unanswered: a node gone without a TCP reset stops counting as connected")
	fs.StringVar(&f.sdsREST, "sds-rest-listen", "", "host:port for Envoy's REST SDS (HTTPS POST /v3/discovery:secrets), same authentication; off when empty")
	fs.StringSliceVar(&f.serverDNS, "server-dns", []string{"localhost"}, "DNS names in the server's own certificate on the TCP endpoints")
	durationFlag(fs, &f.crlValidity, "crl-validity", controlplane.DefaultCRLValidity, "how far ahead a CRL's nextUpdate lies (never less than 2 x --svid-ttl); CRLs are re-signed and pushed at half of it")
	fs.IntVar(&f.maxCRLSerials, "max-crl-serials", controlplane.DefaultMaxCRLSerials, "most serials listed on the CRLs together; a revocation past it is refused: replace the CA with 'meshid ca rotate --now' instead")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "host:port for Prometheus /metrics, /healthz and /readyz (off when empty)")
	fs.IntVar(&f.maxConns, "max-connections", endpoint.DefaultMaxConnections, "most connections held at once by each of --socket, --sds-listen and --sds-rest-listen (lowered to fit the open-file limit; the admin socket has its own 64); -1: no cap")
	fs.IntVar(&f.maxConnsUID, "max-connections-per-uid", endpoint.DefaultMaxConnectionsPerUID, "most connections one local uid holds at once on --socket; -1: no cap")
	fs.Float64Var(&f.agentSignRate, "agent-sign-rate", 100, "most X.509-SVIDs one node agent may have signed per second, sustained (bursts of twice that, at least 2,000, pass), so one agent cannot fill the inventory; -1: no limit")
	f.kube.register(fs)
	f.pcr.register(fs)
	f.st.register(fs)
	fs.BoolVar(&f.fastSign, "fast-sign", false, "sign X.509-SVIDs of in-process ECDSA CA keys without x509.CreateCertificate's post-sign self-check (about 2x the mint rate); a canary is checked at CA load and 1 in 64 SVIDs after signing, and any failure falls back to CreateCertificate")
}

func (f *serverFlags) config(log *slog.Logger) (controlplane.Config, error) {
	kt, err := ca.ParseKeyType(f.caKeyType)
	if err != nil {
		return controlplane.Config{}, fmt.Errorf("--ca-key-type: %w", err)
	}
	var up *ca.Upstream
	if f.upCert != "" || f.upKey != "" {
		if f.upCert == "" || f.upKey == "" {
			return controlplane.Config{}, errors.New("--upstream-ca-cert and --upstream-ca-key go together")
		}
		if up, err = ca.LoadUpstream(f.upCert, f.upKey); err != nil {
			return controlplane.Config{}, fmt.Errorf("--upstream-ca-cert: %w", err)
		}
	}
	// The server's own tests run with seconds-long TTLs through
	// controlplane.Config; an operator gets the documented floor, below which
	// an SVID can expire before the renewal that replaces it arrives.
	if f.svidTTL < ca.MinX509SVIDTTL {
		return controlplane.Config{}, fmt.Errorf("--svid-ttl %s is below the %s minimum", f.svidTTL, ca.MinX509SVIDTTL)
	}
	if !(f.minConv >= 0 && f.minConv <= 1) {
		return controlplane.Config{}, fmt.Errorf("--ca-activate-min-convergence %g: want a fraction from 0 (no gate) to 1", f.minConv)
	}
	minConv := f.minConv
	if minConv == 0 {
		minConv = -1 // Config's "off"; its 0 is the default
	}
	if f.crlValidity <= 0 || f.maxCRLSerials <= 0 {
		return controlplane.Config{}, errors.New("--crl-validity and --max-crl-serials must be positive")
	}
	if f.agentKeepalive < time.Second {
		return controlplane.Config{}, fmt.Errorf("--agent-keepalive %s: must be at least 1s", f.agentKeepalive)
	}
	return controlplane.Config{
		DataDir:     f.dataDir,
		TrustDomain: f.trustDomain,
		SVIDTTL:     f.svidTTL,
		CATTL:       f.caTTL,
		CAKeyType:   kt,
		Upstream:    up,
		KEKFile:     f.kekFile,
		JWTTTL:      f.jwtTTL,
		CAPrepareAt: f.prepareAt, CAActivateAt: f.activateAt, CAPrepareWindow: f.prepareWindow,
		RotateSVIDsOnActivation: f.rotateOnAct,
		SignRate:                f.signRate, SignConcurrency: f.signConc,
		InventoryRetention: f.retention,
		CRLValidity:        f.crlValidity,
		MaxCRLSerials:      f.maxCRLSerials,
		FastSign:           f.fastSign,
		AgentSignRate:      f.agentSignRate,

		CAActivateMinConvergence: minConv,
		Version:                  version(),
		Logger:                   log,
	}, nil
}

func newServerCmd() *cobra.Command {
	var f serverFlags
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the meshid server: CA, entries, admin API, SDS and the SPIFFE Workload API",
		Long: `Run the meshid server. On first start it creates a self-signed CA for the
trust domain (its key sealed with the key-encryption key) in --data-dir.

The admin API listens on --admin-socket; use the meshid client commands
(entry, x509, bundle, ca, certs, revoke, token) against it. The workload
socket (--socket) serves Envoy SDS v3 and the SPIFFE Workload API to local
processes, told apart by their peer credentials; --sds-listen and
--sds-rest-listen serve SDS to remote proxies. The CA rotates itself (see
--ca-prepare-at and --ca-activate-at). SIGTERM or Ctrl-C drains in-flight
requests and exits 0.

On Kubernetes (--kubeconfig, or in a pod), --k8s-agent-service-account lets
the agents of that service account attest with their projected token
(k8s_psat, checked by a TokenReview and the pod's node), --k8s-default-identity
serves every pod spiffe://<td>/ns/<ns>/sa/<sa> from its own node's agent with
no entry, and --k8s-bundle-configmap keeps the trust bundle in a ConfigMap for
the agents' first contact. deploy/kubernetes sets all three. --pcr-signer-name
makes the server the signer of pods' podCertificate volumes (Kubernetes 1.37
pod certificates), and the bundle is published as ClusterTrustBundles and a
meshid-ca-root-cert ConfigMap per namespace.

--store etcd runs the server as one of N replicas sharing an etcd cluster
(--etcd-endpoints, --etcd-ca, --etcd-cert, --etcd-key) and one CA: every
replica serves every API, one elected leader runs the CA lifecycle, and
agents given all replicas (meshid agent --server r1:8443,r2:8443) fail over.
Every replica needs the same --kek-file (meshid kek create FILE, once).
Without an etcd quorum, writes are refused with Unavailable while workloads
keep their SVIDs; meshid store migrate moves a bolt data dir to etcd.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), f.logLevel, f.logFormat)
			if err != nil {
				return err
			}
			cfg, err := f.config(log)
			if err != nil {
				return err
			}
			return runServer(cmd.Context(), cfg, f, nil)
		},
	}
	f.register(cmd, defaultDataDir(), "directory for the store and, by default, the key-encryption key")
	return cmd
}

// runServer opens the server, calls onReady once it listens, and serves
// until ctx is cancelled.
func runServer(ctx context.Context, cfg controlplane.Config, f serverFlags, onReady func(*controlplane.Server, controlplane.Listening) error) error {
	pr, err := f.pcr.setup(f.kube.kubeconfig, cfg.Logger)
	if err != nil {
		return err
	}
	// The pod certificate signer uses Kubernetes too: the trust bundle is
	// then published for its pods as well.
	f.kube.signer = pr != nil
	kr, err := f.kube.setup(&cfg, cfg.Logger)
	if err != nil {
		return err
	}
	if err := f.st.setup(ctx, &cfg, f.kekFile, cfg.Logger); err != nil {
		return err
	}
	srv, err := controlplane.Open(ctx, cfg)
	if err != nil {
		return err
	}
	defer srv.Close()
	if kr != nil {
		wait, err := kr.start(ctx, srv)
		if err != nil {
			return err
		}
		defer wait()
	}
	if pr != nil {
		wait, err := pr.start(ctx, srv)
		if err != nil {
			return err
		}
		defer wait()
	}
	var readyErr error
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	err = srv.Run(runCtx, controlplane.Endpoints{
		AdminSocket: f.adminSocket, Socket: f.socket, MetricsListen: f.metricsListen,
		SDSListen: f.sdsListen, SDSRESTListen: f.sdsREST, AgentListen: f.agentListen, AgentKeepalive: f.agentKeepalive, ServerDNS: f.serverDNS,
		MaxConnections: f.maxConns, MaxConnectionsPerUID: f.maxConnsUID,
	}, func(l controlplane.Listening) {
		if onReady != nil {
			if readyErr = onReady(srv, l); readyErr != nil {
				cancel()
			}
		}
	})
	if readyErr != nil {
		return readyErr
	}
	return err
}

func newDevCmd() *cobra.Command {
	var f serverFlags
	var spiffeID string
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a development identity plane: server plus an entry for you, no config",
		Long: `Run meshid server with a throw-away data dir (unless --data-dir is given) and
a registration entry that gives the current user (unix:uid:<your uid>) the
identity --spiffe-id. It prints what is served where and how to try it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), f.logLevel, f.logFormat)
			if err != nil {
				return err
			}
			if f.dataDir == "" {
				dir, err := os.MkdirTemp("", "meshid-dev-")
				if err != nil {
					return fmt.Errorf("temp data dir: %w", err)
				}
				defer os.RemoveAll(dir)
				f.dataDir = dir
			}
			cfg, err := f.config(log)
			if err != nil {
				return err
			}
			devPrepareWindow(cmd, &cfg)
			uid := os.Getuid()
			return runServer(cmd.Context(), cfg, f, func(srv *controlplane.Server, l controlplane.Listening) error {
				sel := store.Selector{Type: "unix", Value: "uid:" + strconv.Itoa(uid)}
				_, err := srv.CreateEntry(cmd.Context(), controlplane.EntrySpec{SpiffeID: spiffeID, Selectors: []store.Selector{sel}}, "dev")
				if err != nil && !errors.Is(err, store.ErrAlreadyExists) {
					return fmt.Errorf("dev entry: %w", err)
				}
				printBanner(cmd.OutOrStdout(), srv, f, l, spiffeID, uid)
				return nil
			})
		},
	}
	f.register(cmd, "", "directory for the store (default: a temporary directory removed on exit)")
	cmd.Flags().StringVar(&spiffeID, "spiffe-id", "spiffe://cluster.local/ns/default/sa/default", "identity given to the current user")
	return cmd
}

func printBanner(w io.Writer, srv *controlplane.Server, f serverFlags, l controlplane.Listening, spiffeID string, uid int) {
	who := "uid " + strconv.Itoa(uid)
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		who = u.Username + ", " + who
	}
	admin := ""
	if f.adminSocket != endpoint.DefaultLayout().AdminSocket {
		admin = " --admin-socket " + f.adminSocket
	}
	var b strings.Builder
	fmt.Fprintf(&b, "meshid dev: identity plane for trust domain %s is up\n", srv.TrustDomain())
	fmt.Fprintf(&b, "  data dir      %s\n", f.dataDir)
	fmt.Fprintf(&b, "  admin API     unix://%s\n", l.AdminSocket)
	if l.Socket != "" {
		fmt.Fprintf(&b, "  workload API  unix://%s  (Envoy SDS v3 + SPIFFE Workload API)\n", l.Socket)
	}
	if l.SDSAddr != "" {
		fmt.Fprintf(&b, "  SDS over TCP  %s\n", l.SDSAddr)
	}
	if l.AgentAddr != "" {
		fmt.Fprintf(&b, "  agent API     %s\n", l.AgentAddr)
	}
	if l.MetricsAddr != "" {
		fmt.Fprintf(&b, "  metrics       http://%s/metrics\n", l.MetricsAddr)
	}
	fmt.Fprintf(&b, "  entry         %s  <-  unix:uid:%d (you: %s)\n", spiffeID, uid, who)
	fmt.Fprintf(&b, "\nTry, in another terminal:\n")
	fmt.Fprintf(&b, "  meshid entry list%s\n", admin)
	fmt.Fprintf(&b, "  meshid x509 mint%s --spiffe-id %s --out-dir ./certs\n", admin, spiffeID)
	fmt.Fprintf(&b, "  openssl x509 -in ./certs/svid.pem -noout -text\n")
	fmt.Fprintf(&b, "  meshid ca show%s\n", admin)
	fmt.Fprintf(&b, "  meshid certs list%s\n", admin)
	if l.Socket != "" {
		sock := ""
		if l.Socket != endpoint.DefaultLayout().Socket {
			sock = " --socket " + l.Socket
		}
		fmt.Fprintf(&b, "  meshid helper%s --dir ./me --once        # your own SVID, from the Workload API\n", sock)
		fmt.Fprintf(&b, "  meshid envoy bootstrap --spiffe-id %s --socket %s > envoy.yaml\n", spiffeID, l.Socket)
	}
	fmt.Fprintf(&b, "\nCtrl-C stops it.\n")
	fmt.Fprint(w, b.String())
}
