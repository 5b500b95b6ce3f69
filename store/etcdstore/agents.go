package etcdstore

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

const maxAgentSVIDs = 16

func checkAgent(r *store.AgentRecord) error {
	if r.ID == "" {
		return fmt.Errorf("agent: an id is required: %w", store.ErrInvalid)
	}
	if len(r.NodeSVIDs) > maxAgentSVIDs {
		return fmt.Errorf("agent %s: %d node SVIDs, at most %d are kept: %w", r.ID, len(r.NodeSVIDs), maxAgentSVIDs, store.ErrInvalid)
	}
	for _, sv := range r.NodeSVIDs {
		if sv.Serial == "" || len(sv.Serial) > 128 {
			return fmt.Errorf("agent %s: node SVID serial %q: %w", r.ID, sv.Serial, store.ErrInvalid)
		}
	}
	return nil
}

// PutAgent inserts or replaces an agent record.
func (s *Store) PutAgent(ctx context.Context, rec store.AgentRecord, audit *store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if err := checkAgent(&rec); err != nil {
		return fmt.Errorf("put agent: %w", err)
	}
	val, _, err := roundTrip(&rec)
	if err != nil {
		return err
	}
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(s.k.agent+rec.ID, val), s.marker()}, audit)
	if err != nil {
		return err
	}
	_, err = s.txn(ctx, "put agent", nil, ops)
	return err
}

// agentEdit reads agent id and applies fn: the ops storing the result,
// the compare guarding the read, and the record as stored.
func (s *Store) agentEdit(ctx context.Context, id string, fn func(*store.AgentRecord, bool) error) (clientv3.Cmp, []clientv3.Op, store.AgentRecord, error) {
	ak := s.k.agent + id
	v, rev, exists, err := s.getOne(ctx, "update agent "+id, ak)
	if err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	rec := store.AgentRecord{ID: id}
	if exists {
		if err := unmarshal(v, &rec); err != nil {
			return clientv3.Cmp{}, nil, store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, err)
		}
	}
	if err := fn(&rec, exists); err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	if rec.ID != id {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, fmt.Errorf("update agent %s: the update changed the id to %q: %w", id, rec.ID, store.ErrInvalid)
	}
	if err := checkAgent(&rec); err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	val, out, err := roundTrip(&rec)
	if err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	return unchangedCmp(ak, rev), []clientv3.Op{clientv3.OpPut(ak, val), s.marker()}, out, nil
}

// UpdateAgent changes a record in one transaction on its ModRevision,
// re-running fn on a conflict.
func (s *Store) UpdateAgent(ctx context.Context, id string, fn func(*store.AgentRecord, bool) error, audit *store.AuditEvent) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	if id == "" {
		return store.AgentRecord{}, fmt.Errorf("update agent: an id is required: %w", store.ErrInvalid)
	}
	for range maxRetries {
		cmp, ops, out, err := s.agentEdit(ctx, id, fn)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if ops, err = s.withAudit(ops, audit); err != nil {
			return store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "update agent "+id, []clientv3.Cmp{cmp}, ops)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return out, nil
		}
	}
	return store.AgentRecord{}, conflict("update agent " + id)
}

// AttestAgent spends a token and writes the agent record in one
// transaction guarded on both keys' revisions.
func (s *Store) AttestAgent(ctx context.Context, hash string, now time.Time, conn, id string, fn func(store.JoinToken, *store.AgentRecord, bool) error, audit *store.AuditEvent) (store.JoinToken, store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, store.AgentRecord{}, err
	}
	if id == "" {
		return store.JoinToken{}, store.AgentRecord{}, fmt.Errorf("attest agent: an id is required: %w", store.ErrInvalid)
	}
	tk := s.k.token + hash
	for range maxRetries {
		v, trev, ok, err := s.getOne(ctx, "attest agent", tk)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		t, err := redeemable(v, ok, now, conn)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		tok, tops, err := spend(t, tk, now, conn)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		acmp, ops, rec, err := s.agentEdit(ctx, id, func(r *store.AgentRecord, exists bool) error { return fn(tok, r, exists) })
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		if ops, err = s.withAudit(append(tops, ops...), audit); err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "attest agent "+id, []clientv3.Cmp{unchangedCmp(tk, trev), acmp}, ops)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return tok, rec, nil
		}
	}
	return store.JoinToken{}, store.AgentRecord{}, conflict("attest agent " + id)
}

// GetAgent returns one record or store.ErrNotFound.
func (s *Store) GetAgent(ctx context.Context, id string) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	v, _, ok, err := s.readOne(ctx, "get agent", s.k.agent+id)
	if err != nil {
		return store.AgentRecord{}, err
	}
	if !ok {
		return store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
	}
	var r store.AgentRecord
	if err := unmarshal(v, &r); err != nil {
		return r, fmt.Errorf("agent %s: %w", id, err)
	}
	return r, nil
}

// ListAgents returns every record ordered by ID.
func (s *Store) ListAgents(ctx context.Context) ([]store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list agents", s.k.agent, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	return decodeAll[store.AgentRecord](resp)
}

// DeleteAgent removes a record with the audit event.
func (s *Store) DeleteAgent(ctx context.Context, id string, audit store.AuditEvent) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	ak := s.k.agent + id
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, "delete agent", ak)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if !ok {
			return store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		var old store.AgentRecord
		if err := unmarshal(v, &old); err != nil {
			return old, fmt.Errorf("agent %s: %w", id, err)
		}
		ops, err := s.withAudit([]clientv3.Op{clientv3.OpDelete(ak), s.marker()}, &audit)
		if err != nil {
			return store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "delete agent "+id, []clientv3.Cmp{unchangedCmp(ak, rev)}, ops)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return old, nil
		}
	}
	return store.AgentRecord{}, conflict("delete agent " + id)
}
