// Package agent is the node agent (`meshid agent`): it proves to the
// server which node it is, learns over one pushed stream which identities
// the node may serve, makes every workload key on the node, has the server
// sign CSRs for them, and serves SDS and the SPIFFE Workload API on the
// node's own unix socket from its cache (svidcache, behind endpoint). When
// the server is unreachable it keeps serving what it holds and reconnects
// with capped, jittered backoff.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/kube/podattest"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/svidcache"
)

// Config is what an agent needs. Zero values take the defaults.
type Config struct {
	// Server is the server's agent API, host:port, or the replicas' (which
	// share one store and CA) separated by commas: the agent starts at a
	// random one and moves to the next when it loses it (ParseServers).
	Server string
	// TrustDomain is the server's (default cluster.local).
	TrustDomain string
	// JoinToken attests the agent the first time; later starts use the
	// node SVID kept in DataDir.
	JoinToken string
	// NodeAttestor is how the agent proves its node: MethodJoinToken (the
	// default) or MethodK8sPSAT, which presents the projected
	// service-account token in K8sTokenPath, read afresh at every
	// attestation (the kubelet rotates it), and attests anew on every
	// start instead of reusing the node SVID kept in DataDir.
	NodeAttestor string
	K8sTokenPath string
	// TrustBundle are the CAs the server's SVID must chain to on first
	// contact (later, the bundle the server last sent, kept in DataDir).
	// InsecureBootstrap instead trusts whatever server answers the first
	// attestation, and pins the bundle it returns, as SPIRE's
	// insecure_bootstrap does.
	TrustBundle       []*x509.Certificate
	InsecureBootstrap bool
	// DataDir holds the node key and SVID (0600) and the last bundle.
	DataDir string
	// Socket is the node's workload socket.
	Socket string
	// MetricsListen is host:port for /metrics, /healthz and /readyz;
	// empty turns it off.
	MetricsListen string
	Logger        *slog.Logger
	// Now and AfterFunc are the clock renewals and backoff use.
	Now       func() time.Time
	AfterFunc func(d time.Duration, f func()) (stop func() bool)

	// AvailabilityTarget is the outage budget renewals keep: an SVID is
	// renewed once less than this of its life is left, never later than
	// half its life (default DefaultAvailabilityTarget).
	AvailabilityTarget time.Duration
	// NoPersistCache turns off the sealed SVID cache in DataDir (a restart
	// then serves nothing until the server is reached).
	NoPersistCache bool
	// CacheKeyFile is the AES-256 key (package kek's format) sealing the
	// persisted cache; default DataDir/cache.kek, made on first use. Kept
	// elsewhere, a copy of the data dir alone reveals no workload key.
	CacheKeyFile string
	// ServerKeepalive is how long the connection to the server may be
	// silent before the agent pings it; a ping unanswered for a third of
	// that (at least 5 s; gRPC's floor for the interval is 10 s) ends it and
	// the agent moves to the next replica (default DefaultServerKeepalive).
	// Without it a replica gone without a TCP reset (its machine lost
	// power, a partition) held the agent for TCP's retransmission timeout,
	// about 15 minutes, with no pushes from any replica.
	ServerKeepalive time.Duration

	// Pods, if set, turns on the k8s workload attestor: Run watches this
	// node's pods (podattest) before it serves, and callers in a pod's
	// container are attested as that pod (k8s:* selectors) besides unix.
	// A caller whose pod goes loses what it was served at once.
	Pods *podattest.Config
}

// Agent is a running node agent.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	td       spiffeid.TrustDomain
	serverID spiffeid.ID
	dir      *dataDir
	ring     ring // the replicas; connectLoop's alone
	cache    *svidcache.Cache
	index    *entry.Index
	signer   *remoteSigner
	persist  *persister // nil with NoPersistCache

	mu     sync.Mutex
	node   *nodeIdentity
	trust  []*x509.Certificate
	client agentv1.AgentServiceClient // nil while not connected
	// lastBundle is the bundle the server last sent (or the persisted
	// one), kept for the persisted cache.
	lastBundle *agentv1.Bundle

	// current is the replica the Sync stream is held with, lastServer the
	// one it was last held with (failovers count moves away from it).
	current, lastServer string
	failovers           atomic.Uint64

	connected atomic.Bool
	lastSync  atomic.Int64 // unix nanos
	// ws is the workload socket while Run serves it (bundle reports).
	ws atomic.Pointer[endpoint.WorkloadServer]
}

// Open locks the data dir and loads the node identity kept there.
func Open(cfg Config) (*Agent, error) {
	servers, err := ParseServers(cfg.Server)
	if err != nil {
		return nil, err
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "cluster.local"
	}
	if cfg.ServerKeepalive <= 0 {
		cfg.ServerKeepalive = DefaultServerKeepalive
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %w", cfg.TrustDomain, err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.AfterFunc == nil {
		cfg.AfterFunc = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	}
	dir, err := openDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	node, err := dir.loadNode()
	if err != nil {
		dir.close()
		return nil, err
	}
	trust := cfg.TrustBundle
	if saved, err := dir.loadBundle(); err != nil {
		dir.close()
		return nil, fmt.Errorf("saved bundle: %w", err)
	} else if saved != nil && node != nil {
		// The server's CAs rotate: what it last sent beats a file given
		// at first contact.
		trust = saved
	}
	switch cfg.NodeAttestor {
	case "":
		cfg.NodeAttestor = MethodJoinToken
	case MethodJoinToken:
	case MethodK8sPSAT:
		if cfg.K8sTokenPath == "" {
			dir.close()
			return nil, errors.New("node attestor k8s_psat needs the projected service-account token's path (--k8s-token-path)")
		}
		// A fresh token proves the node now; a kept node SVID only that
		// it was once.
		node = nil
	default:
		dir.close()
		return nil, fmt.Errorf("unknown node attestor %q: use %s or %s", cfg.NodeAttestor, MethodJoinToken, MethodK8sPSAT)
	}
	switch {
	case node == nil && cfg.NodeAttestor == MethodJoinToken && cfg.JoinToken == "":
		dir.close()
		return nil, fmt.Errorf("data dir %s holds no node identity: give a join token (meshid token create --agent) to attest", dir.path)
	case len(trust) == 0 && !cfg.InsecureBootstrap:
		dir.close()
		return nil, errors.New("no trust bundle to verify the server with: give --trust-bundle (the server's bundle.pem) or --insecure-bootstrap")
	}
	serverID, _ := spiffeid.FromSegments(td, "meshid", "server")
	a := &Agent{cfg: cfg, log: cfg.Logger, td: td, serverID: serverID, dir: dir, ring: newRing(servers), index: entry.NewIndex(), node: node, trust: trust}
	a.signer = &remoteSigner{a: a}
	if cfg.AvailabilityTarget <= 0 {
		cfg.AvailabilityTarget = DefaultAvailabilityTarget
		a.cfg.AvailabilityTarget = cfg.AvailabilityTarget
	}
	if a.persist, err = openPersister(a); err != nil {
		dir.close()
		return nil, err
	}
	a.cache = svidcache.New(svidcache.Config{Signer: a.signer, Matcher: matcher{a}, Clock: clock{cfg}, Logger: a.log,
		AvailabilityTarget: cfg.AvailabilityTarget, OnChange: a.persist.kick})
	if a.persist != nil {
		// Before the server is reached: a restart during an outage serves
		// what the last run held.
		a.restore()
	}
	return a, nil
}

// Close writes the persisted cache and releases the cache and the data
// dir.
func (a *Agent) Close() {
	a.persist.close()
	a.cache.Close()
	a.dir.close()
}

// ID is the agent's node SVID's ID (zero before the first attestation).
func (a *Agent) ID() spiffeid.ID {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.node == nil {
		return spiffeid.ID{}
	}
	return a.node.id
}

// Connected reports whether the agent holds a Sync stream to the server.
func (a *Agent) Connected() bool { return a.connected.Load() }

type clock struct{ cfg Config }

func (c clock) Now() time.Time { return c.cfg.Now() }
func (c clock) AfterFunc(d time.Duration, f func()) func() bool {
	return c.cfg.AfterFunc(d, f)
}

// Listening says where a running agent listens.
type Listening struct {
	Socket      string
	MetricsAddr string
}

// Run serves the workload socket (and metrics) and keeps a connection to
// the server, until ctx is cancelled. ready, if not nil, is called once
// everything listens.
func (a *Agent) Run(ctx context.Context, ready func(Listening)) error {
	att, stopAttestors, err := a.startWorkloadAttestors(ctx)
	if err != nil {
		return err
	}
	defer stopAttestors()
	ws, err := endpoint.ListenWorkload(endpoint.WorkloadOptions{Socket: a.cfg.Socket, Source: source{a}, Attestors: att, Logger: a.log})
	if err != nil {
		return err
	}
	a.ws.Store(ws)
	got := Listening{Socket: ws.Socket()}
	var ml net.Listener
	if a.cfg.MetricsListen != "" {
		if ml, err = net.Listen("tcp", a.cfg.MetricsListen); err != nil {
			ws.Close()
			return fmt.Errorf("metrics listen %s: %w", a.cfg.MetricsListen, err)
		}
		got.MetricsAddr = ml.Addr().String()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	fatal := make(chan error, 1)
	wg.Go(func() {
		if err := a.connectLoop(ctx); err != nil {
			fatal <- err
			cancel()
		}
	})
	errc := make(chan error, 1)
	if ml != nil {
		wg.Go(func() {
			if err := a.serveMetrics(ctx, ml); err != nil {
				errc <- err
				cancel()
			}
		})
	}
	if ready != nil {
		ready(got)
	}
	err = ws.Serve(ctx)
	cancel()
	wg.Wait()
	if err == nil {
		select {
		case err = <-fatal:
		case err = <-errc:
		default:
		}
	}
	return err
}

// Backoff of reconnection attempts.
const (
	minBackoff = 500 * time.Millisecond
	maxBackoff = 30 * time.Second
)

func (a *Agent) sleep(ctx context.Context, d time.Duration) bool {
	ch := make(chan struct{})
	stop := a.cfg.AfterFunc(d, func() { close(ch) })
	defer stop()
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	}
}

// connectLoop holds a session with the server, reconnecting with capped
// exponential backoff and jitter; the cache serves meanwhile. With
// replicas, a session lost (or refused, e.g. Unavailable) moves at once to
// the next replica; the backoff is taken only once a full round of them
// failed, so a dead replica is never waited on. It returns
// only when ctx ends (nil), the server refuses the join token (the
// agent cannot become anything without a new one: retrying would spin),
// or an operator banned the agent, or evicted it and there is no join
// token to attest again with.
func (a *Agent) connectLoop(ctx context.Context) error {
	backoff := time.Duration(0)
	evicted := false // attesting again after an eviction
	missed := 0      // replicas failed in this round
	for ctx.Err() == nil {
		a.mu.Lock()
		dialed := a.node
		a.mu.Unlock()
		started := a.cfg.Now()
		synced, reached, err := a.session(ctx, a.ring.order())
		a.connected.Store(false)
		a.connectedTo("")
		if ctx.Err() != nil {
			return nil
		}
		switch reason, st := managementRefusal(err); reason {
		case reasonBanned:
			// An operator's decision: retrying cannot change it, and an
			// exit shows it plainly (a restart loop under systemd). What
			// the agent holds was revoked with the ban: a restart, even in
			// an outage, must serve none of it, and coming back takes a
			// new token (unban first).
			if err := a.persist.discard(); err != nil {
				a.log.Error("banned: could not remove the persisted SVID cache", "err", err)
			}
			if err := a.forgetNode(); err != nil {
				a.log.Error("banned: could not remove the node SVID", "err", err)
			}
			return fmt.Errorf("banned by the server, not retrying: %s", st.Message())
		case reasonEvicted:
			a.mu.Lock()
			renewed := a.node != dialed
			a.mu.Unlock()
			if renewed {
				// The server ends a stream whose node SVID it no longer
				// lists, also when renewals replaced it: the current
				// one may well be admitted. Refused too, it is dropped.
				a.log.Info("the server refused an earlier node SVID: reconnecting with the current one", "why", st.Message())
				backoff = 0
				continue
			}
			if err := a.forgetNode(); err != nil {
				return fmt.Errorf("evicted by the server (%s); dropping the node SVID: %w", st.Message(), err)
			}
			if !a.canAttest() {
				return fmt.Errorf("evicted by the server, must attest again: restart the agent with a new join token (meshid token create --agent): %s", st.Message())
			}
			a.log.Warn("evicted by the server: attesting again", "method", a.cfg.NodeAttestor, "server", reached, "why", st.Message())
			evicted = true
			backoff = 0
			continue
		}
		var refused *attestRefused
		if errors.As(err, &refused) {
			if evicted {
				return fmt.Errorf("evicted by the server, and attesting again failed: %w", err)
			}
			return err
		}
		if synced {
			backoff = 0 // the server was there: start over
		}
		if !a.nextRound(reached, synced, a.cfg.Now().Sub(started), &missed) {
			a.log.Warn("server replica lost: serving from cache, trying the next replica", "server", reached, "next", a.ring.order()[0], "err", err)
			continue
		}
		backoff = min(max(2*backoff, minBackoff), maxBackoff)
		d := a.boundBackoff(time.Duration(float64(backoff) * (0.8 + 0.4*rand.Float64())))
		a.log.Warn("server unreachable: serving from cache, retrying", "server", a.cfg.Server, "retry_in", d.Truncate(time.Millisecond), "err", err)
		if !a.sleep(ctx, d) {
			return nil
		}
	}
	return nil
}

// The reasons the server's refusals carry (controlplane/agents.go, an
// errdetails.ErrorInfo): an operator evicted or banned this agent.
const (
	refusalDomain = "meshid"
	reasonEvicted = "AGENT_EVICTED"
	reasonBanned  = "AGENT_BANNED"
)

// managementRefusal returns the reason of a PermissionDenied the server
// sent because of an operator's action, with the status itself ("" if err
// is no such refusal).
func managementRefusal(err error) (string, *status.Status) {
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		return "", nil
	}
	st := se.GRPCStatus()
	if st.Code() != codes.PermissionDenied {
		return "", nil
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == refusalDomain {
			return info.GetReason(), st
		}
	}
	return "", nil
}

// forgetNode drops the node SVID the server no longer admits, from memory
// and from the data dir: a restart must not present it again, and the
// next session attests (with the join token, if there is one).
func (a *Agent) forgetNode() error {
	a.mu.Lock()
	a.node = nil
	a.mu.Unlock()
	// The SVID first: a key alone reads as no identity (loadNode).
	for _, f := range []string{nodeCertFile, nodeKeyFile} {
		if err := os.Remove(a.dir.file(f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// attestRefused is the server's no to a join token: spent, expired,
// unknown, or not made for an agent.
type attestRefused struct {
	err    error
	method string
}

func (e *attestRefused) Error() string {
	if e.method == MethodK8sPSAT {
		return fmt.Sprintf("attestation refused: %v (check the agent's service account is given to the server with --k8s-agent-service-account, and its projected token's audience)", e.err)
	}
	return fmt.Sprintf("attestation refused: %v (make a new one with 'meshid token create --agent')", e.err)
}
func (e *attestRefused) Unwrap() error { return e.err }
