package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/store"
)

// Agent management: the server keeps a record of every attested agent in
// the store (method, node, first and last seen, its live node SVIDs,
// banned). The records reach every replica through the watch (KindAgent),
// so what one replica decides (a ban, an eviction) ends the agent's
// streams and refuses its calls on all of them.
//
// An agent is admitted only while it has a record, is not banned, and
// presents a node SVID listed in it. Evicting deletes the record: the agent
// must attest again with a new token, and the node SVIDs it held before
// stay refused after it has. Banning refuses it (and any new attestation of
// its node) until it is unbanned, and revokes its node SVIDs and every
// live SVID it had signed, so peers applying the pushed CRLs refuse them.

// workloadViaAgent prefixes the inventory Requester of SVIDs an agent had
// signed for its workloads (signOne).
const workloadViaAgent = "workload via agent "

// maxNodeSVIDs bounds the node SVIDs an agent record lists: renewal at
// half-life keeps two or three live.
const maxNodeSVIDs = 8

// agentSeenTimeout bounds the last-seen write when a stream ends, whose
// own context is already done.
const agentSeenTimeout = 5 * time.Second

var (
	errAgentBanned  = errors.New("agent is banned")
	errAgentEvicted = errors.New("agent has no record")
)

// The reasons (an errdetails.ErrorInfo in Domain AgentRefusalDomain) an
// agent is refused with, so that it reacts to an operator's decision
// (agent/agent.go connectLoop) without parsing messages: evicted, it
// attests again; banned, it stops.
const (
	AgentRefusalDomain = "meshid"
	AgentReasonEvicted = "AGENT_EVICTED"
	AgentReasonBanned  = "AGENT_BANNED"
)

// agentRefusal is a PermissionDenied status carrying reason.
func agentRefusal(reason, format string, args ...any) error {
	st := status.Newf(codes.PermissionDenied, format, args...)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: AgentRefusalDomain}); err == nil {
		st = d
	}
	return st.Err()
}

func bannedStatus(id string) error {
	return agentRefusal(AgentReasonBanned, "agent %s is banned: it is refused until 'meshid agent unban'", id)
}

func evictedStatus(id string) error {
	return agentRefusal(AgentReasonEvicted, "evicted: attest again: agent %s has no record on this server; give it a new join token (meshid token create --agent)", id)
}

// agentRecord is the record the projection holds for id.
func (s *Server) agentRecord(id string) (store.AgentRecord, bool) {
	s.agents.mu.Lock()
	defer s.agents.mu.Unlock()
	r, ok := s.agents.recs[id]
	return r, ok
}

// admitAgent refuses a node SVID whose agent was evicted, is banned, or
// has attested again since the SVID was issued. Certificates that are no
// agent's are left to the caller's checks.
func (s *Server) admitAgent(leaf *x509.Certificate) error {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || !s.isAgentID(id) {
		return nil
	}
	rec, ok := s.agentRecord(id.String())
	switch {
	case !ok:
		return evictedStatus(id.String())
	case rec.Banned:
		return bannedStatus(id.String())
	}
	if serial := leaf.SerialNumber.Text(16); !listsSerial(rec, serial) {
		return supersededStatus(id.String(), serial)
	}
	return nil
}

// agentAdmitWait bounds how long a call refused as evicted waits for this
// replica to catch up with the store before the refusal stands.
const agentAdmitWait = 5 * time.Second

// admitAgentSynced is admitAgent, except that a refusal as evicted or
// superseded is decided again once the projection holds every write
// committed before the call: with replicas, the agent may have attested or
// renewed its node SVID on another one a moment ago (that one syncs before
// it answers, recordAttested; this one learns of it through its watch), and
// an agent refused as evicted drops its node SVID. A current projection
// costs nothing here; a ban is never waited on.
func (s *Server) admitAgentSynced(ctx context.Context, leaf *x509.Certificate) error {
	err := s.admitAgent(leaf)
	if err == nil || !isEvictedRefusal(err) {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, agentAdmitWait)
	defer cancel()
	if s.synced(ctx) != nil {
		return err
	}
	return s.admitAgent(leaf)
}

func isEvictedRefusal(err error) bool {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == AgentRefusalDomain && info.GetReason() == AgentReasonEvicted {
			return true
		}
	}
	return false
}

func listsSerial(rec store.AgentRecord, serial string) bool {
	return slices.ContainsFunc(rec.NodeSVIDs, func(n store.AgentSVID) bool { return n.Serial == serial })
}

func supersededStatus(id, serial string) error {
	return agentRefusal(AgentReasonEvicted, "evicted: attest again: node SVID %s of %s is no longer listed for it: issued before its last attestation, replaced by later renewals, or expired", serial, id)
}

// refuseBanned refuses the attestation of a banned agent's node before a
// node SVID is signed for it.
func (s *Server) refuseBanned(id spiffeid.ID) error {
	if rec, ok := s.agentRecord(id.String()); ok && rec.Banned {
		return bannedStatus(id.String())
	}
	return nil
}

func nodeSVID(chain [][]byte) (store.AgentSVID, error) {
	if len(chain) == 0 {
		return store.AgentSVID{}, errors.New("empty node SVID chain")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return store.AgentSVID{}, fmt.Errorf("parse node SVID: %w", err)
	}
	return store.AgentSVID{Serial: leaf.SerialNumber.Text(16), NotAfter: leaf.NotAfter}, nil
}

// recordAttested records an attestation before its node SVID is handed
// out: the SVID becomes the only one the agent is admitted with. The ban
// is checked again in the store's transaction, so a ban racing the
// attestation wins.
func (s *Server) recordAttested(ctx context.Context, id spiffeid.ID, method string, claim attest.NodeClaim, chain [][]byte) error {
	n, err := nodeSVID(chain)
	if err != nil {
		return err
	}
	now := s.now()
	_, err = s.store.UpdateAgent(ctx, id.String(), func(r *store.AgentRecord, exists bool) error {
		return attestedRecord(r, exists, method, claim, n, now)
	}, &store.AuditEvent{Time: now, Actor: id.String(), Action: "agent.attest", Target: id.String(), Detail: "method " + method + ", node SVID " + n.Serial})
	if errors.Is(err, errAgentBanned) {
		return bannedStatus(id.String())
	}
	if err != nil {
		return fmt.Errorf("record agent %s: %w", id, err)
	}
	// The agent's next call may come at once: it must be admitted.
	return s.synced(ctx)
}

// attestedRecord is the agent record after an attestation by method with
// node SVID n: a banned agent is refused (errAgentBanned), and the new SVID
// becomes the only one it is admitted with.
func attestedRecord(r *store.AgentRecord, exists bool, method string, claim attest.NodeClaim, n store.AgentSVID, now time.Time) error {
	if exists && r.Banned {
		return errAgentBanned
	}
	if !exists {
		r.FirstSeen = now
	}
	r.Method, r.Node, r.LastSeen = method, claim.Node, now
	r.Selectors = claim.Selectors
	r.NodeSVIDs = []store.AgentSVID{n}
	return nil
}

// recordRenewed adds a renewed node SVID to the agent's record before it
// is handed out, dropping the expired ones.
func (s *Server) recordRenewed(ctx context.Context, id spiffeid.ID, chain [][]byte) error {
	n, err := nodeSVID(chain)
	if err != nil {
		return err
	}
	now := s.now()
	_, err = s.store.UpdateAgent(ctx, id.String(), func(r *store.AgentRecord, exists bool) error {
		switch {
		case !exists:
			return errAgentEvicted
		case r.Banned:
			return errAgentBanned
		}
		live := slices.DeleteFunc(slices.Clone(r.NodeSVIDs), func(o store.AgentSVID) bool { return !now.Before(o.NotAfter) })
		live = append(live, n)
		r.NodeSVIDs = live[max(0, len(live)-maxNodeSVIDs):]
		r.LastSeen = now
		return nil
	}, nil)
	switch {
	case errors.Is(err, errAgentBanned):
		return bannedStatus(id.String())
	case errors.Is(err, errAgentEvicted):
		return evictedStatus(id.String())
	case err != nil:
		return fmt.Errorf("record agent %s: %w", id, err)
	}
	return s.synced(ctx)
}

// touchAgent sets the agent's last-seen time; errAgentEvicted if it has no
// record (it is never re-created here).
// lastSeenGrain is how fine an agent's last-seen time is kept: the store is
// not written for a connect within it of the last recorded sighting.
const lastSeenGrain = time.Minute

func (s *Server) touchAgent(ctx context.Context, id string) error {
	now := s.now()
	_, err := s.store.UpdateAgent(ctx, id, func(r *store.AgentRecord, exists bool) error {
		if !exists {
			return errAgentEvicted
		}
		r.LastSeen = now
		return nil
	}, nil)
	return err
}

// agentConnected runs once st is in the hub: a ban or eviction applied
// before it was added is caught here, one applied after ends it through
// the hub. It records the agent as seen.
func (s *Server) agentConnected(ctx context.Context, st *agentStream) error {
	id := st.id.String()
	serial := ""
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.PeerCertificates) > 0 {
			serial = info.State.PeerCertificates[0].SerialNumber.Text(16)
		}
	}
	s.agents.mu.Lock()
	st.serial = serial
	rec, ok := s.agents.recs[id]
	s.agents.mu.Unlock()
	switch {
	case !ok:
		return evictedStatus(id)
	case rec.Banned:
		return bannedStatus(id)
	case !listsSerial(rec, serial):
		return supersededStatus(id, serial)
	}
	// Last seen is kept to the minute: an agent that just attested (or
	// reconnects in a storm after a restart) costs no store commit here.
	if s.now().Sub(rec.LastSeen) < lastSeenGrain {
		return nil
	}
	if err := s.touchAgent(ctx, id); errors.Is(err, errAgentEvicted) {
		return evictedStatus(id)
	} else if err != nil {
		s.log.Warn("record agent last seen", "agent", id, "err", err)
	}
	return nil
}

// agentDisconnected records when the agent was last seen, on a context of
// its own: the stream's is done.
func (s *Server) agentDisconnected(ctx context.Context, id spiffeid.ID) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), agentSeenTimeout)
	defer cancel()
	if err := s.touchAgent(ctx, id.String()); err != nil && !errors.Is(err, errAgentEvicted) {
		s.log.Debug("record agent last seen", "agent", id.String(), "err", err)
	}
}

// endAgentLocked ends every open stream of agent id with why; the caller
// holds h.mu.
func (h *agentHub) endAgentLocked(id string, why error) int {
	return h.endLocked(func(st *agentStream) bool { return st.id.String() == id }, func(*agentStream) error { return why })
}

// endLocked ends the open streams end selects, each with why(st); the
// caller holds h.mu.
func (h *agentHub) endLocked(end func(*agentStream) bool, why func(*agentStream) error) int {
	n := 0
	for st := range h.streams {
		if !end(st) {
			continue
		}
		n++
		select {
		case st.kill <- why(st):
		default:
		}
	}
	return n
}

// streamsOf counts the open Sync streams of agent id on this server.
func (h *agentHub) streamsOf(id string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if sess := h.byAgent[id]; sess != nil {
		return sess.n
	}
	return 0
}

// applyAgent follows one agent record change from the watch. The record
// and the streams change under one lock, so a stream being opened either
// sees the new record or is ended (agentConnected).
func (s *Server) applyAgent(ev store.Event) {
	h := &s.agents
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.recs == nil {
		h.recs = map[string]store.AgentRecord{}
	}
	var why error
	if ev.Op == store.OpDelete {
		delete(h.recs, ev.Key)
		why = evictedStatus(ev.Key)
	} else {
		h.recs[ev.Key] = *ev.Agent
		if ev.Agent.Banned {
			why = bannedStatus(ev.Key)
		}
	}
	if why != nil {
		if n := h.endAgentLocked(ev.Key, why); n > 0 {
			s.log.Warn("ended agent streams", "agent", ev.Key, "streams", n, "why", status.Convert(why).Message())
		}
		return
	}
	// A new attestation of the node: streams on the node SVIDs it
	// superseded end (the agent holding them must attest again).
	rec := *ev.Agent
	if n := h.endLocked(func(st *agentStream) bool {
		return st.id.String() == ev.Key && st.serial != "" && !listsSerial(rec, st.serial)
	},
		func(st *agentStream) error { return supersededStatus(ev.Key, st.serial) }); n > 0 {
		s.log.Warn("ended agent streams on superseded node SVIDs", "agent", ev.Key, "streams", n)
	}
}

// loadAgents makes the projection's records those of the store, ending
// the streams of agents that are gone or banned.
func (s *Server) loadAgents(ctx context.Context) error {
	list, err := s.store.ListAgents(ctx)
	if err != nil {
		return fmt.Errorf("load agents: %w", err)
	}
	recs := make(map[string]store.AgentRecord, len(list))
	for _, r := range list {
		recs[r.ID] = r
	}
	h := &s.agents
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = recs
	for st := range h.streams {
		id := st.id.String()
		if r, ok := recs[id]; !ok {
			h.endAgentLocked(id, evictedStatus(id))
		} else if r.Banned {
			h.endAgentLocked(id, bannedStatus(id))
		}
	}
	return nil
}

// agentTLS is the agent listener's TLS config: as the other listeners',
// except that a banned agent's node SVID (revoked with the ban) passes the
// handshake, so that agentCaller can refuse it with the reason
// (bannedStatus). Failed in the handshake, the ban would look to the agent
// like an outage, and a restarted banned agent would retry for ever
// instead of exiting with why.
func (st *serverTLS) agentTLS() *tls.Config {
	cfg := st.config("h2")
	// Agents keep their connection and do not resume sessions (meshid
	// agent sets no session cache): a ticket would only cost each
	// handshake a sealed copy of the agent's certificate chain, and a
	// resumed session would skip VerifyPeerCertificate.
	cfg.SessionTicketsDisabled = true
	cfg.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		err := st.verifyClient(raw, chains)
		if err == nil || !st.bannedAgentCert(raw) {
			return err
		}
		return nil
	}
	return cfg
}

// bannedAgentCert says whether raw is a chain that verifies under the
// bundle to a node SVID of a banned agent.
func (st *serverTLS) bannedAgentCert(raw [][]byte) bool {
	var certs []*x509.Certificate
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return false
		}
		certs = append(certs, c)
	}
	id, _, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(st.srv.td, st.srv.BundleCerts()))
	if err != nil || !st.srv.isAgentID(id) {
		return false
	}
	rec, ok := st.srv.agentRecord(id.String())
	return ok && rec.Banned
}

// agentConnOptions are the agent listener's transport options. Each agent
// holds one mostly idle connection for as long as it runs, so what a
// connection keeps between messages is what a thousand agents cost:
//   - the write buffer is taken from a pool for each flush and given back
//     (SharedWriteBuffer);
//   - there is no read buffer (ReadBufferSize 0): the framer reads from
//     the TLS connection, which buffers a whole record itself, so a
//     second buffer in front of it only held 8 KiB per agent;
//   - the client may not index headers (HeaderTableSize 0): an agent
//     makes a few calls an hour, and the table held ~1.5 KiB of them per
//     connection.
//
// Keepalive: the server pings an agent silent for ka and drops it if the
// ping is not answered (grpc also sets TCP_USER_TIMEOUT to the same
// bound); agents ping too (agent.DefaultServerKeepalive), down to gRPC's
// 10 s floor, and are not sent GOAWAY for it.
func agentConnOptions(st *serverTLS, ka time.Duration) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.SharedWriteBuffer(true), grpc.ReadBufferSize(0), grpc.HeaderTableSize(0),
		grpc.Creds(credentials.NewTLS(st.agentTLS())),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: ka, Timeout: max(ka/3, time.Second)}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: agentMinPing, PermitWithoutStream: true}),
	}
}

// agentMinPing is the shortest ping interval an agent may use: gRPC's own
// floor for clients, so no agent setting can earn a GOAWAY.
const agentMinPing = 10 * time.Second
