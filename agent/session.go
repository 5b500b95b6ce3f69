package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"time"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"

	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/svidcache"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// verifyServer checks the server's certificate: an SVID of the trust
// domain, chaining to the bundle held, naming the server. (Its DNS name
// is not what is checked: the server is known by its SPIFFE ID.)
func (a *Agent) verifyServer(insecure bool) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if insecure {
			return nil
		}
		var certs []*x509.Certificate
		for _, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			certs = append(certs, c)
		}
		a.mu.Lock()
		trust := a.trust
		a.mu.Unlock()
		id, _, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(a.td, trust))
		if err != nil {
			return fmt.Errorf("server certificate is not an SVID of %s under the trust bundle: %w", a.td, err)
		}
		if id != a.serverID {
			return fmt.Errorf("server certificate names %s, not %s", id, a.serverID)
		}
		return nil
	}
}

// dial is a client for the replicas in order (one, or pick_first over
// them), each verified alike.
func (a *Agent) dial(order []string, withNode, insecure bool) (*grpc.ClientConn, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verified by VerifyPeerCertificate, against the SPIFFE ID.
		InsecureSkipVerify:    true, //nolint:gosec
		VerifyPeerCertificate: a.verifyServer(insecure),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			a.mu.Lock()
			defer a.mu.Unlock()
			if !withNode || a.node == nil {
				return &tls.Certificate{}, nil
			}
			return a.node.tlsCert(), nil
		},
	}
	return newConn(order, credentials.NewTLS(cfg), a.cfg.ServerKeepalive)
}

// attest spends the join token for a node SVID and keeps it. reached is
// the replica that answered ("" if none).
func (a *Agent) attest(ctx context.Context, order []string) (reached string, err error) {
	a.mu.Lock()
	insecure := len(a.trust) == 0 && a.cfg.InsecureBootstrap
	a.mu.Unlock()
	cc, err := a.dial(order, false, insecure)
	if err != nil {
		return "", err
	}
	defer cc.Close()
	key, csr, err := newNodeKey()
	if err != nil {
		return "", err
	}
	proof, err := a.nodeProof()
	if err != nil {
		return "", err
	}
	var p peer.Peer
	resp, err := agentv1.NewAgentServiceClient(cc).Attest(ctx, &agentv1.AttestRequest{Method: a.cfg.NodeAttestor, Payload: proof, Csr: csr}, grpc.Peer(&p))
	reached = replicaOf(&p, order)
	if c := status.Code(err); c == codes.PermissionDenied || c == codes.InvalidArgument {
		return reached, &attestRefused{err: status.Convert(err).Err(), method: a.cfg.NodeAttestor}
	}
	if err != nil {
		return reached, fmt.Errorf("attest: %w", err)
	}
	node, err := parseNode(key, resp.GetSvidChain())
	if err != nil {
		return reached, err
	}
	if err := a.dir.saveNode(node); err != nil {
		return reached, fmt.Errorf("keep node identity: %w", err)
	}
	a.mu.Lock()
	a.node = node
	a.mu.Unlock()
	if err := a.setTrust(resp.GetBundle()); err != nil {
		return reached, err
	}
	a.log.Info("attested", "node_id", node.id.String(), "not_after", node.chain[0].NotAfter, "server", reached)
	return reached, nil
}

// setTrust replaces the CAs the server is verified with by the bundle
// the server sent, and keeps it for the next start.
func (a *Agent) setTrust(b *agentv1.Bundle) error {
	var certs []*x509.Certificate
	for _, der := range b.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("bundle from the server: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return errors.New("bundle from the server holds no CA")
	}
	bundle := svidcache.X509Bundle(a.td, certs, b.GetCrls(), b.GetCrlLeafOnly())
	a.mu.Lock()
	a.trust = certs
	a.mu.Unlock()
	if err := a.dir.saveBundle(bundle.PEM); err != nil {
		a.log.Warn("could not keep the trust bundle", "err", err)
	}
	return nil
}

// session attests if it must, then holds one Sync stream until it fails,
// with the first of the replicas in order that answers. synced says
// whether the server answered at all, reached which replica did ("" if
// none could be reached).
func (a *Agent) session(ctx context.Context, order []string) (synced bool, reached string, err error) {
	a.mu.Lock()
	node := a.node
	a.mu.Unlock()
	if node == nil {
		if reached, err := a.attest(ctx, order); err != nil {
			return false, reached, err
		}
	}
	cc, err := a.dial(order, true, false)
	if err != nil {
		return false, "", err
	}
	defer cc.Close()
	client := agentv1.NewAgentServiceClient(cc)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		return false, "", fmt.Errorf("sync: %w", err)
	}
	// The stream has its transport: the replica is known even if it
	// refuses the stream.
	p, _ := peer.FromContext(stream.Context())
	reached = replicaOf(p, order)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	first := true
	for {
		resp, err := stream.Recv()
		if err != nil {
			return !first, reached, fmt.Errorf("sync %s: %w", reached, err)
		}
		if first {
			a.mu.Lock()
			a.client = client
			a.mu.Unlock()
			defer func() {
				a.mu.Lock()
				a.client = nil
				a.mu.Unlock()
			}()
			a.connectedTo(reached)
			a.connected.Store(true)
			a.log.Info("connected to the server", "server", reached, "node_id", a.ID().String())
			wg.Go(func() { a.renewNode(ctx, client) })
			wg.Go(func() { a.reportLoop(ctx, client) })
			first = false
		}
		a.apply(ctx, resp)
	}
}

// nodeRenewDelay is when a node SVID of life is renewed: on the workload
// SVIDs' policy (svidcache's targetDelay, without its jitter), once less
// than the availability target is left, never later than half its life
// nor sooner than a tenth of it. Renewed at half its life, a node SVID as
// short-lived as the workloads' would expire in an outage they ride out
// (TestServerOutageZeroFailures), and with it the agent's only way back
// to the server.
func nodeRenewDelay(life, target time.Duration) time.Duration {
	return max(min(life-target, life/2), life/10)
}

// renewNode replaces the node SVID (nodeRenewDelay) while the session
// lasts.
func (a *Agent) renewNode(ctx context.Context, client agentv1.AgentServiceClient) {
	for {
		a.mu.Lock()
		leaf := a.node.chain[0]
		a.mu.Unlock()
		at := leaf.NotBefore.Add(nodeRenewDelay(leaf.NotAfter.Sub(leaf.NotBefore), a.cfg.AvailabilityTarget))
		if !a.sleep(ctx, max(at.Sub(a.cfg.Now()), 0)) {
			return
		}
		key, csr, err := newNodeKey()
		if err != nil {
			a.log.Error("node SVID renewal", "err", err)
			continue
		}
		resp, err := client.Renew(ctx, &agentv1.RenewRequest{Csr: csr})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Error("node SVID renewal failed; retrying", "err", err)
			if !a.sleep(ctx, minBackoff) {
				return
			}
			continue
		}
		node, err := parseNode(key, resp.GetSvidChain())
		if err == nil {
			err = a.dir.saveNode(node)
		}
		if err != nil {
			a.log.Error("node SVID renewal", "err", err)
			continue
		}
		a.mu.Lock()
		a.node = node
		a.mu.Unlock()
		a.log.Info("renewed the node SVID", "not_after", node.chain[0].NotAfter)
	}
}

// apply brings the agent's entries and bundle to what the server sent.
func (a *Agent) apply(ctx context.Context, resp *agentv1.SyncResponse) {
	a.lastSync.Store(a.cfg.Now().UnixNano())
	changed := false
	if resp.GetFull() {
		keep := map[string]bool{}
		for _, p := range resp.GetEntries() {
			keep[p.GetId()] = true
		}
		for _, id := range a.index.IDs() {
			if !keep[id] {
				a.index.Remove(id)
				changed = true
			}
		}
	}
	for _, p := range resp.GetEntries() {
		e := entryFromProto(p)
		old, had := a.index.Get(e.ID)
		a.index.Put(e)
		changed = true
		if had && !reflect.DeepEqual(old, e) {
			// Its TTL, DNS names or hint changed: what is served must
			// say so now, not at the next renewal.
			a.cache.EntryUpdated(cacheEntry(e))
		}
	}
	for _, id := range resp.GetDeletedEntryIds() {
		a.index.Remove(id)
		changed = true
	}
	if b := resp.GetBundle(); b != nil {
		if err := a.setTrust(b); err != nil {
			a.log.Error("bundle from the server", "err", err)
		} else if err := a.serveBundle(b); err != nil {
			a.log.Error("bundle from the server", "err", err)
		}
		a.persist.kick()
	}
	if changed {
		a.cache.EntriesChanged(ctx)
		a.persist.kick()
	}
	if resp.GetFull() {
		// Reached the server (again): what fell due while it was away is
		// renewed now, together, so the remote signer sends it in one
		// batch (or a few), not one round trip per workload at its own
		// backoff step.
		if n := a.cache.RenewDue(); n > 0 {
			a.log.Info("renewing what fell due while the server was unreachable", "svids", n)
		}
	}
}

func entryFromProto(p *agentv1.Entry) entry.Entry {
	e := entry.Entry{ID: p.GetId(), SpiffeID: p.GetSpiffeId(), TTL: time.Duration(p.GetTtlSeconds()) * time.Second,
		DNSNames: p.GetDnsNames(), Hint: p.GetHint(), ParentID: p.GetParentId()}
	for _, s := range p.GetSelectors() {
		e.Selectors = append(e.Selectors, entry.Selector{Type: s.GetType(), Value: s.GetValue()})
	}
	return e
}
