package boltstore

import (
	"bytes"
	"context"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// UpdateEntry replaces an entry, its uniqueness claim and records the audit
// event in one transaction; see store.Store.
func (s *Store) UpdateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) (store.Entry, error) {
	if err := ctx.Err(); err != nil {
		return store.Entry{}, err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return store.Entry{}, fmt.Errorf("update entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val := encodeEntry(&e)
	stored, err := decodeEntry(val)
	if err != nil {
		return store.Entry{}, fmt.Errorf("update entry %s: %w", e.ID, err)
	}
	newKey := uniqKey(&e)
	id := []byte(e.ID)
	var old store.Entry
	err = s.commitWatched("update entry "+e.ID, true, func(tx *bolt.Tx, ch *changes) error {
		entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
		v := entries.Get(id)
		if v == nil {
			return fmt.Errorf("entry %s: %w", e.ID, store.ErrNotFound)
		}
		var err error
		if old, err = decodeEntry(v); err != nil {
			return err
		}
		if other := uniq.Get(newKey); other != nil && !bytes.Equal(other, id) {
			return fmt.Errorf("entry %s has the same spiffe id %s and selectors: %w", other, e.SpiffeID, store.ErrAlreadyExists)
		}
		// As in DeleteEntry, only our own claim is dropped.
		if oldKey := uniqKey(&old); !bytes.Equal(oldKey, newKey) && bytes.Equal(uniq.Get(oldKey), id) {
			if err := uniq.Delete(oldKey); err != nil {
				return err
			}
		}
		if err := entries.Put(id, val); err != nil {
			return err
		}
		if err := uniq.Put(newKey, id); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindEntry, Op: store.OpPut, Key: e.ID, Entry: &stored})
		return s.appendAudit(tx, audit)
	})
	if err != nil {
		return store.Entry{}, err
	}
	return old, nil
}
