package boltstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// uniqKey identifies an entry's (ParentID, SpiffeID, selector set), SPIRE's
// rule: the same ID and selectors under two parents are two entries. Fields
// are length-prefixed before hashing so that no two different triples
// serialise alike ("a"+"bc" vs "ab"+"c"). Selectors are taken in the
// caller's order, which the Store contract says is sorted.
//
// The parent is appended only when set, so an entry without one keeps the
// key stores written before parents existed hold for it; and since the
// selector count fixes where a parentless encoding ends, a parent's extra
// bytes cannot make two triples collide.
func uniqKey(e *store.Entry) []byte {
	var b enc
	b.str(e.SpiffeID)
	b.uvarint(uint64(len(e.Selectors)))
	for _, s := range e.Selectors {
		b.str(s.Type)
		b.str(s.Value)
	}
	if e.ParentID != "" {
		b.str(e.ParentID)
	}
	sum := sha256.Sum256(b.b)
	return sum[:]
}

// CreateEntry stores a new entry and its audit event in one transaction.
func (s *Store) CreateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return fmt.Errorf("create entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val := encodeEntry(&e)
	stored, err := decodeEntry(val)
	if err != nil {
		return fmt.Errorf("create entry %s: %w", e.ID, err)
	}
	uk := uniqKey(&e)
	id := []byte(e.ID)
	return s.commitWatched("create entry "+e.ID, true, func(tx *bolt.Tx, ch *changes) error {
		entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
		if entries.Get(id) != nil {
			return fmt.Errorf("entry id %s: %w", e.ID, store.ErrAlreadyExists)
		}
		if other := uniq.Get(uk); other != nil {
			return fmt.Errorf("entry %s has the same spiffe id %s, selectors and parent: %w", other, e.SpiffeID, store.ErrAlreadyExists)
		}
		if err := entries.Put(id, val); err != nil {
			return err
		}
		if err := uniq.Put(uk, id); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindEntry, Op: store.OpPut, Key: e.ID, Entry: &stored})
		return s.appendAudit(tx, audit)
	})
}

// DeleteEntry removes an entry and records the audit event in one
// transaction, returning the deleted entry.
func (s *Store) DeleteEntry(ctx context.Context, id string, audit store.AuditEvent) (store.Entry, error) {
	if err := ctx.Err(); err != nil {
		return store.Entry{}, err
	}
	var e store.Entry
	err := s.commitWatched("delete entry "+id, false, func(tx *bolt.Tx, ch *changes) error {
		entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
		v := entries.Get([]byte(id))
		if v == nil {
			return fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var err error
		if e, err = decodeEntry(v); err != nil {
			return err
		}
		if err := entries.Delete([]byte(id)); err != nil {
			return err
		}
		// Only drop the uniqueness claim if it is ours; a mismatch would mean
		// an inconsistent file, and deleting another entry's claim would let
		// a duplicate in.
		uk := uniqKey(&e)
		if bytes.Equal(uniq.Get(uk), []byte(id)) {
			if err := uniq.Delete(uk); err != nil {
				return err
			}
		}
		old := e
		ch.add(store.Event{Kind: store.KindEntry, Op: store.OpDelete, Key: id, Entry: &old})
		return s.appendAudit(tx, audit)
	})
	if err != nil {
		return store.Entry{}, err
	}
	return e, nil
}

// GetEntry returns one entry or store.ErrNotFound.
func (s *Store) GetEntry(ctx context.Context, id string) (store.Entry, error) {
	if err := ctx.Err(); err != nil {
		return store.Entry{}, err
	}
	var e store.Entry
	err := s.view("get entry "+id, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketEntries).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var err error
		e, err = decodeEntry(v)
		return err
	})
	return e, err
}

// ListEntries pages through entries by ID. The page token is the last ID of
// the previous page.
func (s *Store) ListEntries(ctx context.Context, q store.EntryQuery) ([]store.Entry, string, error) {
	if err := ctx.Err(); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list entries: negative page size: %w", store.ErrInvalid)
	}
	var (
		out  []store.Entry
		next string
	)
	if q.PageSize > 0 {
		out = make([]store.Entry, 0, min(q.PageSize, 1024))
	}
	err := s.view("list entries", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEntries)
		if q.PageSize == 0 {
			// Start-up loads every entry: size the slice once.
			out = make([]store.Entry, 0, b.Stats().KeyN)
		}
		c := b.Cursor()
		var k, v []byte
		if q.PageToken == "" {
			k, v = c.First()
		} else {
			after := []byte(q.PageToken)
			k, v = c.Seek(after)
			if bytes.Equal(k, after) {
				k, v = c.Next()
			}
		}
		for ; k != nil; k, v = c.Next() {
			if q.PageSize > 0 && len(out) == q.PageSize {
				next = out[len(out)-1].ID
				break
			}
			if len(out)%4096 == 4095 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			e, err := decodeEntry(v)
			if err != nil {
				return fmt.Errorf("entry %q: %w", k, err)
			}
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	return out, next, nil
}
