package boltstore

import (
	"context"
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// keyCRLs holds the signed CRL set, JSON: one value a few times a day, so
// the hand-made codec's speed buys nothing here.
var keyCRLs = []byte("crls")

// PutCRLs replaces the signed CRL set; see store.Store. Like NextCRLNumber
// it is not gated on write health: CRLs must keep coming while the disk is
// full, like the revocations they carry. One process owns a bbolt file, so
// there is no other leader to fence out.
func (s *Store) PutCRLs(ctx context.Context, c store.SignedCRLs) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		return err
	}
	val, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("put crls: %w", err)
	}
	// What a read returns, less what the watch leaves out (see
	// store.KindCRLs).
	var stored store.SignedCRLs
	if err := json.Unmarshal(val, &stored); err != nil {
		return fmt.Errorf("put crls: %w", err)
	}
	stored.DER, stored.Covers = nil, ""
	return s.commitWatched("put crls", false, func(tx *bolt.Tx, ch *changes) error {
		if err := tx.Bucket(bucketMeta).Put(keyCRLs, val); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindCRLs, Op: store.OpPut, CRLs: &stored})
		return nil
	})
}

// GetCRLs returns the signed CRL set, or store.ErrNotFound.
func (s *Store) GetCRLs(ctx context.Context) (store.SignedCRLs, error) {
	if err := ctx.Err(); err != nil {
		return store.SignedCRLs{}, err
	}
	var out store.SignedCRLs
	err := s.view("get crls", func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(keyCRLs)
		if v == nil {
			return store.ErrNotFound
		}
		return json.Unmarshal(v, &out)
	})
	return out, err
}
