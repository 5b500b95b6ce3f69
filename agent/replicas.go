package agent

// Replicas (issue 13): --server names one server or the replicas of one,
// which share the CA and the store. The node SVID, the data dir and what
// was synced are therefore as good on one replica as on another, and
// moving between them never re-attests or drops the cache.
//
// Each session dials every replica in one grpc.ClientConn: a manual
// resolver lists them, starting at the one the agent wants next, and
// pick_first (with its happy eyeballs) connects to the first that
// completes the handshake. The TLS check is the same for every address:
// the server's SVID must name spiffe://<td>/meshid/server under the bundle
// held (verifyServer). Which replica answered reaches the agent through
// the handshake (the address's attributes, carried into the AuthInfo), so
// the agent knows where it is without a dialer of its own.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/attributes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// ParseServers reads a --server value: one host:port, or the replicas'
// host:port separated by commas. Each is checked (a host, a numeric port
// 1-65535, no repeats), so a typo fails at start, not as an endless
// "server unreachable".
func ParseServers(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, errors.New("server address is required")
	}
	parts := strings.Split(s, ",")
	out := make([]string, 0, len(parts))
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if p == "" {
			return nil, fmt.Errorf("server list %q: item %d is empty", s, i+1)
		}
		host, port, err := net.SplitHostPort(p)
		if err != nil {
			return nil, fmt.Errorf("server %q is not host:port", p)
		}
		if host == "" || strings.ContainsAny(host, "/ ") {
			return nil, fmt.Errorf("server %q: no valid host", p)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("server %q: port %q is not a number from 1 to 65535", p, port)
		}
		if slices.Contains(out, p) {
			return nil, fmt.Errorf("server list %q names %s twice", s, p)
		}
		out = append(out, p)
	}
	return out, nil
}

// stableSession is how long a synced session must have held for its
// replica to count as healthy: a replica that drops agents at once is
// counted against the round, so replicas that all accept and drop cannot
// make the agent cycle through them without backoff.
const stableSession = maxBackoff

// ring is the replicas in --server order and where the next session
// starts; only connectLoop (and the sessions it runs) touches it.
type ring struct {
	servers []string
	next    int
}

// newRing starts at a random replica, so that a thousand agents given the
// same list spread over the replicas instead of all landing on the first.
func newRing(servers []string) ring {
	return ring{servers: servers, next: rand.IntN(len(servers))}
}

// order is the replicas a session tries, the one wanted next first.
func (r *ring) order() []string {
	return append(slices.Clone(r.servers[r.next:]), r.servers[:r.next]...)
}

// passed moves the start past addr, the replica the last session reached.
func (r *ring) passed(addr string) bool {
	i := slices.Index(r.servers, addr)
	if i < 0 {
		return false
	}
	r.next = (i + 1) % len(r.servers)
	return true
}

// DefaultServerKeepalive is Config.ServerKeepalive's default: a lost
// replica is left within ~20 s. The server (--agent-keepalive) admits pings
// down to gRPC's 10 s floor.
const DefaultServerKeepalive = 15 * time.Second

// replicaKey is the resolver.Address attribute naming the replica as
// --server does (the peer's address is only an IP).
type replicaKey struct{}

// replicaCreds passes each handshake to the TLS credentials and tags the
// resulting AuthInfo with the replica it was made with.
type replicaCreds struct {
	credentials.TransportCredentials
}

// replicaInfo is the AuthInfo of a connection to a replica.
type replicaInfo struct {
	credentials.AuthInfo
	replica string
}

func (c replicaCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		return nil, nil, err
	}
	var name string
	if attrs := credentials.ClientHandshakeInfoFromContext(ctx).Attributes; attrs != nil {
		name, _ = attrs.Value(replicaKey{}).(string)
	}
	return conn, replicaInfo{AuthInfo: info, replica: name}, nil
}

func (c replicaCreds) Clone() credentials.TransportCredentials {
	return replicaCreds{c.TransportCredentials.Clone()}
}

// newConn is a client for the replicas in order. One address is dialed
// exactly as before replicas existed (grpc's dns resolver on it).
func newConn(order []string, creds credentials.TransportCredentials, ka time.Duration) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(replicaCreds{creds}),
		// PermitWithoutStream: between a lost Sync stream and the next
		// there is none, and a dead replica must still be noticed.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: ka, Timeout: max(ka/3, 5*time.Second), PermitWithoutStream: true}),
	}
	if len(order) == 1 {
		return grpc.NewClient(order[0], opts...)
	}
	r := manual.NewBuilderWithScheme("meshid-replicas")
	eps := make([]resolver.Endpoint, len(order))
	for i, s := range order {
		host, _, _ := net.SplitHostPort(s)
		// ServerName: the SNI each replica is greeted with is its own
		// host, as when it was dialed alone.
		eps[i] = resolver.Endpoint{Addresses: []resolver.Address{{Addr: s, ServerName: host, Attributes: attributes.New(replicaKey{}, s)}}}
	}
	r.InitialState(resolver.State{Endpoints: eps})
	// pick_first (the default) in the order given: no shuffle, the
	// agent chose the start.
	return grpc.NewClient(r.Scheme()+":///replicas", append(opts, grpc.WithResolvers(r))...)
}

// replicaOf names the replica a call reached ("" if none), from its peer.
func replicaOf(p *peer.Peer, order []string) string {
	if p == nil {
		return ""
	}
	if ri, ok := p.AuthInfo.(replicaInfo); ok && ri.replica != "" {
		return ri.replica
	}
	if len(order) == 1 {
		return order[0]
	}
	return ""
}

// connectedTo records the replica the Sync stream is held with ("" when
// none), and counts a failover when it is another than the last one.
func (a *Agent) connectedTo(addr string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.current = addr
	if addr == "" {
		return
	}
	if a.lastServer != "" && a.lastServer != addr {
		a.failovers.Add(1)
		a.log.Info("failed over to another server replica", "from", a.lastServer, "to", addr)
	}
	a.lastServer = addr
}

// Server is the replica the agent holds its Sync stream with, as given in
// Config.Server; "" while it holds none.
func (a *Agent) Server() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.current
}

// Failovers counts the times the Sync stream moved to another replica.
func (a *Agent) Failovers() uint64 { return a.failovers.Load() }

// nextRound decides what follows a session that ended: reached is the
// replica it got to ("" if none answered), synced whether it synced, held
// how long it lasted. It returns whether the agent must back off (a full
// round of the replicas failed) rather than try the next one at once.
func (a *Agent) nextRound(reached string, synced bool, held time.Duration, missed *int) bool {
	n := len(a.ring.servers)
	if synced && held >= stableSession {
		*missed = 0
	}
	if reached == "" || !a.ring.passed(reached) {
		// pick_first tried every replica in this session: none answered.
		*missed = n
	} else {
		*missed++
	}
	if *missed < n {
		return false
	}
	*missed = 0
	return true
}
