package boltstore

import (
	"context"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

func (s *Store) appendAudit(tx *bolt.Tx, ev store.AuditEvent) error {
	if ev.Time.IsZero() {
		ev.Time = s.now()
	}
	b := tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return fmt.Errorf("audit sequence: %w", err)
	}
	if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), encodeAudit(&ev)); err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// AppendAudit records an admin action that has no store change of its own.
// A zero Time is replaced by Options.Now.
func (s *Store) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.update("append audit", func(tx *bolt.Tx) error { return s.appendAudit(tx, ev) })
}

// ListAudit returns the newest events first, at most limit (0: all).
func (s *Store) ListAudit(ctx context.Context, limit int) ([]store.AuditEvent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("list audit: negative limit: %w", store.ErrInvalid)
	}
	var out []store.AuditEvent
	err := s.view("list audit", func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		for k, v := c.Last(); k != nil && (limit == 0 || len(out) < limit); k, v = c.Prev() {
			ev, err := decodeAudit(v)
			if err != nil {
				return fmt.Errorf("audit event %x: %w", k, err)
			}
			out = append(out, ev)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
