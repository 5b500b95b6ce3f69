package boltstore

import (
	"context"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

const revokedV1 byte = 1

// bucketRevoked maps serial -> RevokedSerial.
var bucketRevoked = []byte("revoked")

func encodeRevoked(r *store.RevokedSerial) []byte {
	e := enc{b: make([]byte, 0, 48+len(r.Serial)+len(r.CAID)+len(r.SpiffeID))}
	e.byte1(revokedV1)
	e.str(r.Serial)
	e.str(r.CAID)
	e.str(r.SpiffeID)
	e.time(r.NotAfter)
	e.time(r.RevokedAt)
	return e.b
}

func decodeRevoked(v []byte) (store.RevokedSerial, error) {
	var r store.RevokedSerial
	d := dec{s: string(v)}
	if err := d.version("revoked serial", revokedV1); err != nil {
		return r, err
	}
	r.Serial = d.str()
	r.CAID = d.str()
	r.SpiffeID = d.str()
	r.NotAfter = d.time()
	r.RevokedAt = d.time()
	return r, d.finish("revoked serial")
}

// RevokeSerials adds serials to the revocation list; see store.Store.
func (s *Store) RevokeSerials(ctx context.Context, serials []store.RevokedSerial, audit store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	for _, r := range serials {
		if r.Serial == "" || len(r.Serial) > maxSerialLen || r.NotAfter.IsZero() {
			return fmt.Errorf("revoke: serial and expiry are required: %w", store.ErrInvalid)
		}
	}
	return s.commitWatched("revoke serials", false, func(tx *bolt.Tx, ch *changes) error {
		b := tx.Bucket(bucketRevoked)
		for _, r := range serials {
			if b.Get([]byte(r.Serial)) != nil {
				continue // also a duplicate earlier in serials: its Put is visible
			}
			val := encodeRevoked(&r)
			stored, err := decodeRevoked(val)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(r.Serial), val); err != nil {
				return err
			}
			ch.add(store.Event{Kind: store.KindRevoked, Op: store.OpPut, Key: r.Serial, Revoked: &stored})
		}
		return s.appendAudit(tx, audit)
	})
}

// ListRevoked returns every revoked serial not yet pruned.
func (s *Store) ListRevoked(ctx context.Context) ([]store.RevokedSerial, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []store.RevokedSerial
	err := s.view("list revoked", func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRevoked).ForEach(func(k, v []byte) error {
			r, err := decodeRevoked(v)
			if err != nil {
				return fmt.Errorf("revoked serial %s: %w", k, err)
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}

// PruneRevoked drops serials whose certificate expired before cutoff.
func (s *Store) PruneRevoked(ctx context.Context, cutoff time.Time) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	n := 0
	err := s.commitWatched("prune revoked", false, func(tx *bolt.Tx, ch *changes) error {
		var err error
		n, err = deleteWhere(tx.Bucket(bucketRevoked), func(v []byte) (bool, error) {
			r, err := decodeRevoked(v)
			ok := err == nil && r.NotAfter.Before(cutoff)
			if ok {
				ch.add(store.Event{Kind: store.KindRevoked, Op: store.OpDelete, Key: r.Serial, Revoked: &r})
			}
			return ok, err
		})
		return err
	})
	return n, err
}

// deleteWhere deletes every key of b whose value match selects. Keys are
// collected first: deleting under a live cursor can skip keys in bbolt.
func deleteWhere(b *bolt.Bucket, match func(v []byte) (bool, error)) (int, error) {
	var doomed [][]byte
	err := b.ForEach(func(k, v []byte) error {
		ok, err := match(v)
		if err != nil {
			return fmt.Errorf("key %x: %w", k, err)
		}
		if ok {
			doomed = append(doomed, append([]byte(nil), k...))
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, k := range doomed {
		if err := b.Delete(k); err != nil {
			return 0, err
		}
	}
	return len(doomed), nil
}
