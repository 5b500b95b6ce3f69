package boltstore

import (
	"context"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// agentV2 adds the node's selectors after BannedAt; v1 records (without
// them) still decode.
const (
	agentV1 byte = 1
	agentV2 byte = 2
)

// bucketAgents maps agent ID -> AgentRecord. It is made by the first write
// that needs it rather than at Open, so a file written before agents
// existed opens unchanged (and without a write) and reads as having none.
var bucketAgents = []byte("agents")

// maxAgentSVIDs bounds the node SVIDs one record keeps: an agent renews
// at half-life, so a handful are live at once; the bound only keeps a
// misbehaving one from growing its record without limit.
const maxAgentSVIDs = 16

func encodeAgent(r *store.AgentRecord) []byte {
	e := enc{b: make([]byte, 0, 64+len(r.ID)+len(r.Method)+len(r.Node)+len(r.NodeSVIDs)*32)}
	e.byte1(agentV2)
	e.str(r.ID)
	e.str(r.Method)
	e.str(r.Node)
	e.time(r.FirstSeen)
	e.time(r.LastSeen)
	e.uvarint(uint64(len(r.NodeSVIDs)))
	for _, s := range r.NodeSVIDs {
		e.str(s.Serial)
		e.time(s.NotAfter)
	}
	if r.Banned {
		e.byte1(1)
	} else {
		e.byte1(0)
	}
	e.time(r.BannedAt)
	e.uvarint(uint64(len(r.Selectors)))
	for _, sel := range r.Selectors {
		e.str(sel)
	}
	return e.b
}

func decodeAgent(v []byte) (store.AgentRecord, error) {
	var r store.AgentRecord
	d := dec{s: string(v)}
	ver := agentV1
	if len(v) > 0 && v[0] == agentV2 {
		ver = agentV2
	}
	if err := d.version("agent", ver); err != nil {
		return r, err
	}
	r.ID = d.str()
	r.Method = d.str()
	r.Node = d.str()
	r.FirstSeen = d.time()
	r.LastSeen = d.time()
	if n := d.count(); n > 0 {
		r.NodeSVIDs = make([]store.AgentSVID, n)
		for i := range r.NodeSVIDs {
			r.NodeSVIDs[i].Serial = d.str()
			r.NodeSVIDs[i].NotAfter = d.time()
		}
	}
	r.Banned = d.byte1() == 1
	r.BannedAt = d.time()
	if ver >= agentV2 {
		if n := d.count(); n > 0 {
			r.Selectors = make([]string, n)
			for i := range r.Selectors {
				r.Selectors[i] = d.str()
			}
		}
	}
	return r, d.finish("agent")
}

func checkAgent(r *store.AgentRecord) error {
	if r.ID == "" {
		return fmt.Errorf("agent: an id is required: %w", store.ErrInvalid)
	}
	if len(r.NodeSVIDs) > maxAgentSVIDs {
		return fmt.Errorf("agent %s: %d node SVIDs, at most %d are kept: %w", r.ID, len(r.NodeSVIDs), maxAgentSVIDs, store.ErrInvalid)
	}
	for _, s := range r.NodeSVIDs {
		if s.Serial == "" || len(s.Serial) > maxSerialLen {
			return fmt.Errorf("agent %s: node SVID serial %q: %w", r.ID, s.Serial, store.ErrInvalid)
		}
	}
	return nil
}

// putAgent stores rec in tx and records the watch event.
func putAgent(tx *bolt.Tx, ch *changes, rec *store.AgentRecord) (store.AgentRecord, error) {
	if err := checkAgent(rec); err != nil {
		return store.AgentRecord{}, err
	}
	val := encodeAgent(rec)
	stored, err := decodeAgent(val)
	if err != nil {
		return store.AgentRecord{}, err
	}
	b, err := tx.CreateBucketIfNotExists(bucketAgents)
	if err != nil {
		return store.AgentRecord{}, err
	}
	if err := b.Put([]byte(rec.ID), val); err != nil {
		return store.AgentRecord{}, err
	}
	// Watchers share the event's value: the caller gets its own slice.
	ev := stored
	ev.NodeSVIDs = slices.Clone(stored.NodeSVIDs)
	ch.add(store.Event{Kind: store.KindAgent, Op: store.OpPut, Key: rec.ID, Agent: &ev})
	return stored, nil
}

// PutAgent inserts or replaces an agent record; see store.AgentStore.
func (s *Store) PutAgent(ctx context.Context, rec store.AgentRecord, audit *store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkAgent(&rec); err != nil {
		return fmt.Errorf("put agent: %w", err)
	}
	return s.commitWatched("put agent", true, func(tx *bolt.Tx, ch *changes) error {
		if _, err := putAgent(tx, ch, &rec); err != nil {
			return err
		}
		if audit != nil {
			return s.appendAudit(tx, *audit)
		}
		return nil
	})
}

// UpdateAgent changes an agent record in one transaction; see
// store.AgentStore. It is not refused while the store is unhealthy: a ban
// takes trust away, and refusing it on a full disk protects nothing.
func (s *Store) UpdateAgent(ctx context.Context, id string, fn func(*store.AgentRecord, bool) error, audit *store.AuditEvent) (store.AgentRecord, error) {
	if err := ctx.Err(); err != nil {
		return store.AgentRecord{}, err
	}
	if id == "" {
		return store.AgentRecord{}, fmt.Errorf("update agent: an id is required: %w", store.ErrInvalid)
	}
	var out store.AgentRecord
	err := s.commitWatched("update agent "+id, false, func(tx *bolt.Tx, ch *changes) error {
		var err error
		out, err = s.updateAgentTx(tx, ch, id, fn, audit)
		return err
	})
	if err != nil {
		return store.AgentRecord{}, err
	}
	return out, nil
}

// updateAgentTx is UpdateAgent's work in tx.
func (s *Store) updateAgentTx(tx *bolt.Tx, ch *changes, id string, fn func(*store.AgentRecord, bool) error, audit *store.AuditEvent) (store.AgentRecord, error) {
	rec := store.AgentRecord{ID: id}
	exists := false
	if b := tx.Bucket(bucketAgents); b != nil {
		if v := b.Get([]byte(id)); v != nil {
			var err error
			if rec, err = decodeAgent(v); err != nil {
				return store.AgentRecord{}, err
			}
			exists = true
		}
	}
	if err := fn(&rec, exists); err != nil {
		return store.AgentRecord{}, err
	}
	if rec.ID != id {
		return store.AgentRecord{}, fmt.Errorf("update agent %s: the update changed the id to %q: %w", id, rec.ID, store.ErrInvalid)
	}
	out, err := putAgent(tx, ch, &rec)
	if err != nil {
		return store.AgentRecord{}, err
	}
	if audit != nil {
		return out, s.appendAudit(tx, *audit)
	}
	return out, nil
}

// AttestAgent spends a join token and writes the agent record in one
// transaction; see store.AgentStore. Both are one commit (and one fsync)
// where UseToken then UpdateAgent were two, each waiting for bbolt's one
// writer: with many agents attesting at once that wait was most of an
// attestation. Like CreateToken it is refused while the store is
// unhealthy: it adds an agent.
func (s *Store) AttestAgent(ctx context.Context, hash string, now time.Time, conn, id string, fn func(store.JoinToken, *store.AgentRecord, bool) error, audit *store.AuditEvent) (store.JoinToken, store.AgentRecord, error) {
	if err := ctx.Err(); err != nil {
		return store.JoinToken{}, store.AgentRecord{}, err
	}
	if id == "" {
		return store.JoinToken{}, store.AgentRecord{}, fmt.Errorf("attest agent: an id is required: %w", store.ErrInvalid)
	}
	var (
		tok store.JoinToken
		rec store.AgentRecord
	)
	err := s.commitWatched("attest agent "+id, true, func(tx *bolt.Tx, ch *changes) error {
		var err error
		// An error from here on rolls the whole transaction back, the
		// token's write with it.
		if tok, err = spendToken(tx, ch, hash, now, conn); err != nil {
			return err
		}
		t := tok
		rec, err = s.updateAgentTx(tx, ch, id, func(r *store.AgentRecord, exists bool) error { return fn(t, r, exists) }, audit)
		return err
	})
	if err != nil {
		return store.JoinToken{}, store.AgentRecord{}, err
	}
	return tok, rec, nil
}

// GetAgent returns one agent record or store.ErrNotFound.
func (s *Store) GetAgent(ctx context.Context, id string) (store.AgentRecord, error) {
	if err := ctx.Err(); err != nil {
		return store.AgentRecord{}, err
	}
	var out store.AgentRecord
	err := s.view("get agent", func(tx *bolt.Tx) error {
		var v []byte
		if b := tx.Bucket(bucketAgents); b != nil {
			v = b.Get([]byte(id))
		}
		if v == nil {
			return fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		var err error
		out, err = decodeAgent(v)
		return err
	})
	return out, err
}

// ListAgents returns every agent record ordered by ID (bbolt keeps keys
// sorted).
func (s *Store) ListAgents(ctx context.Context) ([]store.AgentRecord, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []store.AgentRecord
	err := s.view("list agents", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAgents)
		if b == nil {
			return nil
		}
		return b.ForEach(func(_, v []byte) error {
			r, err := decodeAgent(v)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteAgent removes an agent record with its audit event; see
// store.AgentStore. Like UpdateAgent it is attempted on an unhealthy store.
func (s *Store) DeleteAgent(ctx context.Context, id string, audit store.AuditEvent) (store.AgentRecord, error) {
	if err := ctx.Err(); err != nil {
		return store.AgentRecord{}, err
	}
	var old store.AgentRecord
	err := s.commitWatched("delete agent "+id, false, func(tx *bolt.Tx, ch *changes) error {
		b := tx.Bucket(bucketAgents)
		var v []byte
		if b != nil {
			v = b.Get([]byte(id))
		}
		if v == nil {
			return fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		var err error
		if old, err = decodeAgent(v); err != nil {
			return err
		}
		if err := b.Delete([]byte(id)); err != nil {
			return err
		}
		ev := old
		ev.NodeSVIDs = slices.Clone(old.NodeSVIDs)
		ch.add(store.Event{Kind: store.KindAgent, Op: store.OpDelete, Key: id, Agent: &ev})
		return s.appendAudit(tx, audit)
	})
	if err != nil {
		return store.AgentRecord{}, err
	}
	return old, nil
}
