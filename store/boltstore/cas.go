package boltstore

import (
	"context"
	"fmt"
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// PutCA inserts or replaces a CA record and, if audit is non-nil, records the
// event in the same transaction.
func (s *Store) PutCA(ctx context.Context, rec store.CARecord, audit *store.AuditEvent) error {
	var audits []store.AuditEvent
	if audit != nil {
		audits = []store.AuditEvent{*audit}
	}
	return s.PutCAs(ctx, []store.CARecord{rec}, audits)
}

// PutCAs inserts or replaces every record of recs and records audits, in
// one transaction.
func (s *Store) PutCAs(ctx context.Context, recs []store.CARecord, audits []store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(recs) == 0 {
		return fmt.Errorf("put cas: no record: %w", store.ErrInvalid)
	}
	vals := make([][]byte, len(recs))
	stored := make([]store.CARecord, len(recs))
	ids := make([]string, len(recs))
	for i := range recs {
		if recs[i].ID == "" {
			return fmt.Errorf("put ca: empty id: %w", store.ErrInvalid)
		}
		vals[i] = encodeCA(&recs[i])
		var err error
		if stored[i], err = decodeCA(vals[i]); err != nil { // what a read returns, for the watch
			return fmt.Errorf("put ca %s: %w", recs[i].ID, err)
		}
		ids[i] = recs[i].ID
	}
	return s.commitWatched("put ca "+strings.Join(ids, ","), true, func(tx *bolt.Tx, ch *changes) error {
		for i := range recs {
			if err := tx.Bucket(bucketCAs).Put([]byte(recs[i].ID), vals[i]); err != nil {
				return err
			}
			ch.add(store.Event{Kind: store.KindCA, Op: store.OpPut, Key: recs[i].ID, CA: &stored[i]})
		}
		for _, a := range audits {
			if err := s.appendAudit(tx, a); err != nil {
				return err
			}
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
