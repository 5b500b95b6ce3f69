package etcdstore

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// uniqKey is boltstore's rule: (SpiffeID, selector set, ParentID) hashed
// with length prefixes, the parent only when set.
func (s *Store) uniqKey(e *store.Entry) string {
	var b []byte
	str := func(v string) { b = binary.AppendUvarint(b, uint64(len(v))); b = append(b, v...) }
	str(e.SpiffeID)
	b = binary.AppendUvarint(b, uint64(len(e.Selectors)))
	for _, sel := range e.Selectors {
		str(sel.Type)
		str(sel.Value)
	}
	if e.ParentID != "" {
		str(e.ParentID)
	}
	sum := sha256.Sum256(b)
	return s.k.uniq + hex.EncodeToString(sum[:])
}

// CreateEntry stores a new entry, its uniqueness claim and its audit event
// in one transaction that requires both keys to be absent.
func (s *Store) CreateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return fmt.Errorf("create entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&e)
	if err != nil {
		return fmt.Errorf("create entry %s: %w", e.ID, err)
	}
	ek, uk := s.k.entry+e.ID, s.uniqKey(&e)
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(ek, val), clientv3.OpPut(uk, e.ID), s.marker()}, &audit)
	if err != nil {
		return err
	}
	resp, err := s.txn(ctx, "create entry "+e.ID,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(ek), "=", 0), clientv3.Compare(clientv3.CreateRevision(uk), "=", 0)},
		ops, clientv3.OpGet(ek, clientv3.WithCountOnly()), clientv3.OpGet(uk))
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		if resp.Responses[0].GetResponseRange().Count > 0 {
			return fmt.Errorf("entry id %s: %w", e.ID, store.ErrAlreadyExists)
		}
		other := ""
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
			other = string(kvs[0].Value)
		}
		return fmt.Errorf("entry %s has the same spiffe id %s, selectors and parent: %w", other, e.SpiffeID, store.ErrAlreadyExists)
	}
	return nil
}

// getOne reads key: its value and ModRevision, or ok false.
func (s *Store) getOne(ctx context.Context, what, key string) (val []byte, rev int64, ok bool, err error) {
	return s.getOneWith(ctx, what, key, s.get)
}

// readOne is getOne for methods that only read (see read).
func (s *Store) readOne(ctx context.Context, what, key string) (val []byte, rev int64, ok bool, err error) {
	return s.getOneWith(ctx, what, key, s.read)
}

func (s *Store) getOneWith(ctx context.Context, what, key string, get func(context.Context, string, string, ...clientv3.OpOption) (*clientv3.GetResponse, error)) (val []byte, rev int64, ok bool, err error) {
	resp, err := get(ctx, what, key)
	if err != nil {
		return nil, 0, false, err
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, false, nil
	}
	return resp.Kvs[0].Value, resp.Kvs[0].ModRevision, true, nil
}

// unchangedCmp holds while key is still at rev (absent when rev is 0).
func unchangedCmp(key string, rev int64) clientv3.Cmp {
	if rev == 0 {
		return clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	}
	return clientv3.Compare(clientv3.ModRevision(key), "=", rev)
}

// dropClaim deletes uniqueness claim uk only if it is id's.
func dropClaim(uk, id string) clientv3.Op {
	return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value(uk), "=", id)}, []clientv3.Op{clientv3.OpDelete(uk)}, nil)
}

// DeleteEntry removes an entry and its claim with the audit event.
func (s *Store) DeleteEntry(ctx context.Context, id string, audit store.AuditEvent) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	what := "delete entry " + id
	ek := s.k.entry + id
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, ek)
		if err != nil {
			return store.Entry{}, err
		}
		if !ok {
			return store.Entry{}, fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var e store.Entry
		if err := unmarshal(v, &e); err != nil {
			return store.Entry{}, fmt.Errorf("%s: %w", what, err)
		}
		ops, err := s.withAudit([]clientv3.Op{clientv3.OpDelete(ek), dropClaim(s.uniqKey(&e), id), s.marker()}, &audit)
		if err != nil {
			return store.Entry{}, err
		}
		resp, err := s.txn(ctx, what, []clientv3.Cmp{unchangedCmp(ek, rev)}, ops)
		if err != nil {
			return store.Entry{}, err
		}
		if resp.Succeeded {
			return e, nil
		}
	}
	return store.Entry{}, conflict(what)
}

// UpdateEntry replaces an entry, moving its uniqueness claim, with the
// audit event.
func (s *Store) UpdateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return store.Entry{}, fmt.Errorf("update entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&e)
	if err != nil {
		return store.Entry{}, fmt.Errorf("update entry %s: %w", e.ID, err)
	}
	what := "update entry " + e.ID
	ek, nk := s.k.entry+e.ID, s.uniqKey(&e)
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, ek)
		if err != nil {
			return store.Entry{}, err
		}
		if !ok {
			return store.Entry{}, fmt.Errorf("entry %s: %w", e.ID, store.ErrNotFound)
		}
		var old store.Entry
		if err := unmarshal(v, &old); err != nil {
			return store.Entry{}, fmt.Errorf("%s: %w", what, err)
		}
		cmps := []clientv3.Cmp{unchangedCmp(ek, rev)}
		ops := []clientv3.Op{clientv3.OpPut(ek, val), s.marker()}
		if oldK := s.uniqKey(&old); oldK != nk {
			// The new claim must be free (or, after a crash mid-way
			// elsewhere, already ours).
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(nk), "=", 0))
			ops = append(ops, dropClaim(oldK, e.ID), clientv3.OpPut(nk, e.ID))
		}
		if ops, err = s.withAudit(ops, &audit); err != nil {
			return store.Entry{}, err
		}
		resp, err := s.txn(ctx, what, cmps, ops, clientv3.OpGet(ek, clientv3.WithCountOnly()), clientv3.OpGet(nk))
		if err != nil {
			return store.Entry{}, err
		}
		if resp.Succeeded {
			return old, nil
		}
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 && string(kvs[0].Value) != e.ID {
			return store.Entry{}, fmt.Errorf("entry %s has the same spiffe id %s and selectors: %w", kvs[0].Value, e.SpiffeID, store.ErrAlreadyExists)
		}
	}
	return store.Entry{}, conflict(what)
}

// GetEntry returns one entry or store.ErrNotFound.
func (s *Store) GetEntry(ctx context.Context, id string) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	v, _, ok, err := s.readOne(ctx, "get entry "+id, s.k.entry+id)
	if err != nil {
		return store.Entry{}, err
	}
	if !ok {
		return store.Entry{}, fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
	}
	var e store.Entry
	if err := unmarshal(v, &e); err != nil {
		return store.Entry{}, fmt.Errorf("entry %s: %w", id, err)
	}
	return e, nil
}

// ListEntries pages through entries by ID. The page token is the last ID
// of the previous page.
func (s *Store) ListEntries(ctx context.Context, q store.EntryQuery) ([]store.Entry, string, error) {
	if err := s.check(ctx); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list entries: negative page size: %w", store.ErrInvalid)
	}
	from := s.k.entry
	if q.PageToken != "" {
		from = s.k.entry + q.PageToken + "\x00"
	}
	opts := []clientv3.OpOption{clientv3.WithRange(clientv3.GetPrefixRangeEnd(s.k.entry))}
	if q.PageSize > 0 {
		opts = append(opts, clientv3.WithLimit(int64(q.PageSize)+1))
	}
	resp, err := s.read(ctx, "list entries", from, opts...)
	if err != nil {
		return nil, "", err
	}
	out, err := decodeAll[store.Entry](resp)
	if err != nil {
		return nil, "", err
	}
	next := ""
	if q.PageSize > 0 && len(out) > q.PageSize {
		out = out[:q.PageSize]
		next = out[len(out)-1].ID
	}
	return out, next, nil
}

// ---- tokens ----
