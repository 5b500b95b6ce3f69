package cli

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/endpoint"
)

func newAgentCmd() *cobra.Command {
	var (
		server, trustDomain, token, tokenFile, bundle, dataDir, socket, logLevel, logFormat, metricsListen string
		insecure                                                                                           bool
		// The outage settings (issue 10 part 3).
		availability   time.Duration
		keepaliveEvery time.Duration
		noPersist      bool
		cacheKeyFile   string
		// Node attestation (k8s_psat: the Kubernetes issue).
		nodeAttestor, k8sTokenPath string
		k8s                        *agentK8sFlags
	)
	cmd := &cobra.Command{
		Use:   "agent --server HOST:PORT[,HOST:PORT...] [--data-dir DIR] (the first start also: --join-token T and --trust-bundle FILE or --insecure-bootstrap)",
		Short: "Run a node agent: serve SDS and the SPIFFE Workload API on this node from SVIDs the server signs",
		Long: `Run the meshid node agent. It proves to the server (meshid server
--agent-listen) which node it is, the first time with a join token made by
'meshid token create --agent', and keeps the node SVID it gets in --data-dir
(0600), so a restart reconnects without a new token. It then holds one stream
on which the server pushes the registration entries this node may serve and
the trust bundle, makes every workload key on this node and has the server
sign CSRs for them, and serves Envoy SDS v3 and the SPIFFE Workload API on
--socket exactly as the server's own workload socket does.

The server is verified by its SPIFFE ID (spiffe://<trust domain>/meshid/server)
under --trust-bundle (the server's bundle, e.g. from 'meshid bundle show'),
or, with --insecure-bootstrap, trusted on first contact and pinned from then
on. While the server is unreachable the agent keeps serving what it holds and
reconnects with backoff; it never serves an expired SVID.

--server takes the replicas of one server separated by commas
(r1:8443,r2:8443,r3:8443): replicas share the CA and the store, so the node
SVID and everything synced stay valid on each. The agent starts at a random
replica (agents spread over them), moves to the next at once when it loses the
one it has (or is refused, e.g. Unavailable), and backs off only once every
replica failed in a row. Each is verified by the same SPIFFE ID check. The
replica in use is meshid_agent_server_info{address=...} 1 and in /readyz, moves
are counted in meshid_agent_server_failovers_total. Each SVID is
renewed when less than --availability-target of its life is left (never later
than half its life): that is how long the node's workloads stay valid if the
server vanishes, exported as meshid_agent_outage_budget_seconds. What the agent
serves (keys included) is kept in --data-dir sealed with AES-256-GCM under
--cache-key-file, so a restart while the server is down serves every still-valid
SVID at once (--no-persist-cache turns that off). SIGTERM or Ctrl-C drains and
exits 0.

The agent's own ID is spiffe://<trust domain>/meshid/agent/join/<node-id>
(logged as node_id); entries made with 'meshid entry create --parent-id'
that ID are served by this agent only, entries without a parent by every
agent and by the server's own workload socket.

On Kubernetes (the DaemonSet in deploy/kubernetes), --node-attestor k8s_psat
proves the node with the pod's projected service-account token
(--k8s-token-path, audience meshid) on every start instead of a join token;
the agent is then spiffe://<trust domain>/meshid/agent/k8s_psat/<cluster>/<node-uid>.
With --kubeconfig or in a pod, the k8s workload attestor maps each caller to
its pod (cgroup -> container ID -> a pod watched on --node-name, default
$NODE_NAME) and adds k8s:ns, k8s:sa, k8s:pod-label:K:V, ... selectors; with the
server's --k8s-default-identity every pod gets spiffe://<td>/ns/<ns>/sa/<sa>.`,
		Example: `  # on the server's host
  meshid server --agent-listen 0.0.0.0:8443 ...
  meshid bundle show > bundle.pem
  meshid token create --agent --node-id web-1 --ttl 1h > web-1.token
  # on node web-1 (later restarts need only --server and --data-dir)
  meshid agent --server meshid.example:8443 --join-token-file web-1.token --trust-bundle bundle.pem \
      --data-dir /var/lib/meshid-agent --socket /run/meshid/workload/workload.sock
  # three replicas of one server (meshid server --store etcd)
  meshid agent --server r1:8443,r2:8443,r3:8443 --data-dir /var/lib/meshid-agent
  # in a Kubernetes DaemonSet pod
  meshid agent --server meshid.meshid.svc:8443 --node-attestor k8s_psat \
      --k8s-token-path /var/run/secrets/meshid/token --trust-bundle /run/meshid/bundle/bundle.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), logLevel, logFormat)
			if err != nil {
				return err
			}
			if _, err := agent.ParseServers(server); err != nil {
				return fmt.Errorf("--server: %w", err)
			}
			if tokenFile != "" {
				if token != "" {
					return fmt.Errorf("give --join-token or --join-token-file, not both")
				}
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return fmt.Errorf("join token: %w", err)
				}
				token = string(bytes.TrimSpace(b))
			}
			cfg := agent.Config{Server: server, TrustDomain: trustDomain, JoinToken: token, InsecureBootstrap: insecure,
				DataDir: dataDir, Socket: socket, MetricsListen: metricsListen, Logger: log,
				AvailabilityTarget: availability, NoPersistCache: noPersist, CacheKeyFile: cacheKeyFile,
				NodeAttestor: nodeAttestor, K8sTokenPath: k8sTokenPath, ServerKeepalive: keepaliveEvery}
			if nodeAttestor == agent.MethodK8sPSAT && token != "" {
				return fmt.Errorf("--node-attestor k8s_psat proves the node with the service-account token: drop --join-token")
			}
			if availability <= 0 {
				return fmt.Errorf("--availability-target %s: must be positive", availability)
			}
			if keepaliveEvery < 10*time.Second {
				return fmt.Errorf("--server-keepalive %s: must be at least 10s (gRPC's floor, and the server's --agent-keepalive admits no faster pings)", keepaliveEvery)
			}
			if noPersist && cacheKeyFile != "" {
				return fmt.Errorf("give --cache-key-file or --no-persist-cache, not both")
			}
			if err := k8s.configure(cmd.Flags(), &cfg, log); err != nil {
				return err
			}
			if bundle != "" {
				b, err := os.ReadFile(bundle)
				if err != nil {
					return fmt.Errorf("trust bundle: %w", err)
				}
				if cfg.TrustBundle, err = agent.ParseBundlePEM(b); err != nil {
					return fmt.Errorf("%s: %w", bundle, err)
				}
			}
			a, err := agent.Open(cfg)
			if err != nil {
				return err
			}
			defer a.Close()
			return a.Run(cmd.Context(), func(l agent.Listening) {
				log.Info("agent serving", "socket", l.Socket, "metrics", l.MetricsAddr, "server", server)
			})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&server, "server", "", "the server's agent API, host:port (meshid server --agent-listen), or its replicas' separated by commas (failover between them)")
	fs.StringVar(&trustDomain, "trust-domain", "cluster.local", "the server's trust domain")
	fs.StringVar(&token, "join-token", "", "agent join token for the first attestation (prefer --join-token-file: flags show in ps)")
	fs.StringVar(&tokenFile, "join-token-file", "", "file holding the agent join token")
	fs.StringVar(&nodeAttestor, "node-attestor", agent.MethodJoinToken, "how the agent proves its node: join_token (--join-token, once) or k8s_psat (a projected service-account token with audience meshid, presented on every start)")
	fs.StringVar(&k8sTokenPath, "k8s-token-path", "/var/run/secrets/meshid/token", "k8s_psat: the projected service-account token file (re-read at every attestation: the kubelet rotates it)")
	fs.StringVar(&bundle, "trust-bundle", "", "PEM file of the CAs the server's SVID chains to (first contact; later the bundle the server last sent, kept in --data-dir)")
	fs.BoolVar(&insecure, "insecure-bootstrap", false, "trust the server on first contact without --trust-bundle, and pin the bundle it returns")
	fs.StringVar(&dataDir, "data-dir", "/var/lib/meshid-agent", "directory for the node key and SVID (0700, one agent at a time)")
	fs.StringVar(&socket, "socket", endpoint.DefaultLayout().Socket, "the node's workload socket (SDS and the SPIFFE Workload API), made 0666 in a 0755 directory")
	fs.StringVar(&metricsListen, "metrics-listen", "", "host:port for Prometheus /metrics (meshid_agent_*), /healthz and /readyz (off when empty)")
	fs.DurationVar(&availability, "availability-target", agent.DefaultAvailabilityTarget,
		"renew each SVID when less than this of its life is left (never later than half its life): how long workloads stay valid if the server vanishes")
	fs.DurationVar(&keepaliveEvery, "server-keepalive", agent.DefaultServerKeepalive,
		"ping the server when the connection has been silent this long; unanswered for a third of it (at least 5s), the agent moves to the next replica (a replica gone without a TCP reset is otherwise noticed after ~15 min)")
	fs.BoolVar(&noPersist, "no-persist-cache", false, "do not keep the served SVIDs (and their keys) sealed in --data-dir; a restart then serves nothing until the server is reached")
	fs.StringVar(&cacheKeyFile, "cache-key-file", "", "AES-256 key file (64 hex characters, 0600; made if missing) sealing the persisted SVID cache (default <data-dir>/"+agent.DefaultCacheKeyFile+"; keep it off the data dir's volume so a copy of that alone reveals no key)")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	logFormatFlag(fs, &logFormat)
	k8s = addAgentK8sFlags(fs)
	_ = cmd.MarkFlagRequired("server")
	cmd.AddCommand(agentAdminCmds()...)
	return cmd
}
