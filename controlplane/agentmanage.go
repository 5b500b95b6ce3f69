package controlplane

// What operators do to agents through the admin API (meshid agent
// list|show|evict|ban|unban): each is a store write that reaches every
// replica through the watch (applyAgent, agents.go).

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/store"
)

// AgentInfo is an agent's record with what this server sees of it now.
type AgentInfo struct {
	store.AgentRecord
	// Streams is how many Sync streams the agent has open on this server.
	Streams int
}

func (s *Server) agentInfo(r store.AgentRecord) AgentInfo {
	return AgentInfo{AgentRecord: r, Streams: s.agents.streamsOf(r.ID)}
}

// resolveAgent turns what an administrator typed, the agent's SPIFFE ID or
// its node name, into the agent's ID.
func (s *Server) resolveAgent(ctx context.Context, ref string) (string, error) {
	if ref == "" {
		return "", invalidf("give the agent's SPIFFE ID or node name")
	}
	if strings.HasPrefix(ref, "spiffe://") {
		id, err := spiffeid.FromString(ref)
		if err != nil || !s.isAgentID(id) {
			return "", invalidf("%q is not a node agent's SPIFFE ID (spiffe://%s%s<method>/<node>)", ref, s.td, agentPath)
		}
		return id.String(), nil
	}
	if !nodeIDPattern.MatchString(ref) {
		return "", invalidf("%q is neither a node agent's SPIFFE ID nor a node name", ref)
	}
	list, err := s.store.ListAgents(ctx)
	if err != nil {
		return "", fmt.Errorf("list agents: %w", err)
	}
	var ids []string
	for _, r := range list {
		if r.Node == ref {
			ids = append(ids, r.ID)
		}
	}
	switch len(ids) {
	case 0:
		return "", fmt.Errorf("no agent on node %q: %w", ref, store.ErrNotFound)
	case 1:
		return ids[0], nil
	}
	return "", invalidf("node %q has several agents (%s): give the SPIFFE ID", ref, strings.Join(ids, ", "))
}

// ListAgents returns every agent record, by ID.
func (s *Server) ListAgents(ctx context.Context) ([]AgentInfo, error) {
	list, err := s.store.ListAgents(ctx)
	if err != nil {
		return nil, fmt.Errorf("list agents: %w", err)
	}
	out := make([]AgentInfo, 0, len(list))
	for _, r := range list {
		out = append(out, s.agentInfo(r))
	}
	return out, nil
}

// GetAgent returns one agent's record (by SPIFFE ID or node name).
func (s *Server) GetAgent(ctx context.Context, ref string) (AgentInfo, error) {
	id, err := s.resolveAgent(ctx, ref)
	if err != nil {
		return AgentInfo{}, err
	}
	r, err := s.store.GetAgent(ctx, id)
	if err != nil {
		return AgentInfo{}, fmt.Errorf("agent %s: %w", id, err)
	}
	return s.agentInfo(r), nil
}

// EvictAgent deletes an agent's record: its streams end and its node SVIDs
// are refused on every replica until it attests again with a new join
// token. A banned agent is not evicted (that would lift the ban).
func (s *Server) EvictAgent(ctx context.Context, ref, actor string) (store.AgentRecord, error) {
	id, err := s.resolveAgent(ctx, ref)
	if err != nil {
		return store.AgentRecord{}, err
	}
	r, err := s.store.GetAgent(ctx, id)
	if err != nil {
		return store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, err)
	}
	if r.Banned {
		return store.AgentRecord{}, &FailedPreconditionError{msg: fmt.Sprintf("agent %s is banned; evicting it would lift the ban: unban it first", id)}
	}
	old, err := s.store.DeleteAgent(ctx, id, store.AuditEvent{Time: s.now(), Actor: actor, Action: "agent.evict", Target: id})
	if err != nil {
		return store.AgentRecord{}, fmt.Errorf("evict agent %s: %w", id, err)
	}
	if err := s.synced(ctx); err != nil {
		return old, err
	}
	s.log.Warn("agent evicted", "agent", id, "actor", actor)
	return old, nil
}

// BanAgent refuses an agent until UnbanAgent and revokes its node SVIDs
// and every live SVID it had signed; the CRLs are pushed to every peer.
// Banning a banned agent revokes again what it may have missed (a ban
// whose revocation failed is finished by repeating it).
func (s *Server) BanAgent(ctx context.Context, ref, actor string) (AgentInfo, []store.RevokedSerial, error) {
	id, err := s.resolveAgent(ctx, ref)
	if err != nil {
		return AgentInfo{}, nil, err
	}
	if _, err := s.store.GetAgent(ctx, id); err != nil {
		return AgentInfo{}, nil, fmt.Errorf("agent %s: %w", id, err)
	}
	match := func(r store.IssuedSVID) bool { return r.SpiffeID == id || r.Requester == workloadViaAgent+id }
	// Refused before anything changes if the CRLs cannot take them.
	if err := s.checkCRLRoom(ctx, match); err != nil {
		return AgentInfo{}, nil, err
	}
	now := s.now()
	rec, err := s.store.UpdateAgent(ctx, id, func(r *store.AgentRecord, exists bool) error {
		if !exists {
			return fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		if !r.Banned {
			r.Banned, r.BannedAt = true, now
		}
		return nil
	}, &store.AuditEvent{Time: now, Actor: actor, Action: "agent.ban", Target: id})
	if err != nil {
		return AgentInfo{}, nil, fmt.Errorf("ban agent %s: %w", id, err)
	}
	// Refused from here on (streams ended, no more signing) before the
	// inventory is read, so nothing it gets signed escapes the revocation
	// (signOne checks the ban again after signing).
	if err := s.synced(ctx); err != nil {
		return s.agentInfo(rec), nil, err
	}
	serials, err := s.revokeRows(ctx, match, id, actor, 0)
	if err != nil {
		return s.agentInfo(rec), serials, fmt.Errorf("ban agent %s: the agent is refused, but revoking its SVIDs failed (ban it again to retry): %w", id, err)
	}
	s.log.Warn("agent banned", "agent", id, "revoked", len(serials), "actor", actor)
	return s.agentInfo(rec), serials, nil
}

// UnbanAgent lets a banned agent attest again (with a new join token: its
// node SVIDs were revoked).
func (s *Server) UnbanAgent(ctx context.Context, ref, actor string) (AgentInfo, error) {
	id, err := s.resolveAgent(ctx, ref)
	if err != nil {
		return AgentInfo{}, err
	}
	rec, err := s.store.UpdateAgent(ctx, id, func(r *store.AgentRecord, exists bool) error {
		if !exists {
			return fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		if !r.Banned {
			return &FailedPreconditionError{msg: fmt.Sprintf("agent %s is not banned", id)}
		}
		r.Banned, r.BannedAt = false, time.Time{}
		// Its node SVIDs were revoked with the ban: only a new
		// attestation admits it.
		r.NodeSVIDs = nil
		return nil
	}, &store.AuditEvent{Time: s.now(), Actor: actor, Action: "agent.unban", Target: id})
	if err != nil {
		return AgentInfo{}, fmt.Errorf("unban agent %s: %w", id, err)
	}
	if err := s.synced(ctx); err != nil {
		return s.agentInfo(rec), err
	}
	s.log.Info("agent unbanned", "agent", id, "actor", actor)
	return s.agentInfo(rec), nil
}
