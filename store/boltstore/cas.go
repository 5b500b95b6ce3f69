package boltstore

import (
	"context"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// PutCA inserts or replaces a CA record and, if audit is non-nil, records the
// event in the same transaction.
func (s *Store) PutCA(ctx context.Context, rec store.CARecord, audit *store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if rec.ID == "" {
		return fmt.Errorf("put ca: empty id: %w", store.ErrInvalid)
	}
	val := encodeCA(&rec)
	stored, err := decodeCA(val) // what a read returns, for the watch
	if err != nil {
		return fmt.Errorf("put ca %s: %w", rec.ID, err)
	}
	return s.commitWatched("put ca "+rec.ID, true, func(tx *bolt.Tx, ch *changes) error {
		if err := tx.Bucket(bucketCAs).Put([]byte(rec.ID), val); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindCA, Op: store.OpPut, Key: rec.ID, CA: &stored})
		if audit != nil {
			return s.appendAudit(tx, *audit)
		}
		return nil
	})
}

// ListCAs returns every CA record, oldest CreatedAt first (ties by ID).
func (s *Store) ListCAs(ctx context.Context) ([]store.CARecord, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []store.CARecord
	err := s.view("list cas", func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCAs).ForEach(func(k, v []byte) error {
			c, err := decodeCA(v)
			if err != nil {
				return fmt.Errorf("ca %q: %w", k, err)
			}
			out = append(out, c)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	// Keys are IDs, so ForEach order is by ID and a stable sort keeps that
	// as the tie-break.
	slices.SortStableFunc(out, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}
