package boltstore

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// Serials are hex; the bound keeps one absurd row from failing the whole
// group commit it shares with other callers (bbolt rejects keys > 32 KiB).
const maxSerialLen = 128

// ListSVIDs pages through the inventory ordered by NotAfter, then Serial. The
// page token is the hex of the last row's index key.
func (s *Store) ListSVIDs(ctx context.Context, q store.SVIDQuery) ([]store.IssuedSVID, string, error) {
	if err := ctx.Err(); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list svids: negative page size: %w", store.ErrInvalid)
	}
	var start, after []byte
	if !q.NotExpiredAt.IsZero() {
		if !nanosInRange(q.NotExpiredAt) {
			return nil, "", fmt.Errorf("list svids: NotExpiredAt %s out of range: %w", q.NotExpiredAt, store.ErrInvalid)
		}
		if n := q.NotExpiredAt.UnixNano(); n < 1<<63-1 {
			start = expiryPrefix(n + 1) // strictly after: NotAfter <= NotExpiredAt is expired
		}
	}
	if q.PageToken != "" {
		tok, err := hex.DecodeString(q.PageToken)
		if err != nil || len(tok) < expiryPrefixLen {
			return nil, "", fmt.Errorf("list svids: malformed page token: %w", store.ErrInvalid)
		}
		if bytes.Compare(tok, start) >= 0 {
			start, after = tok, tok
		}
	}
	hasEnd := !q.ExpiringBefore.IsZero()
	var end int64
	if hasEnd {
		if !nanosInRange(q.ExpiringBefore) {
			return nil, "", fmt.Errorf("list svids: ExpiringBefore %s out of range: %w", q.ExpiringBefore, store.ErrInvalid)
		}
		end = q.ExpiringBefore.UnixNano()
	}

	var (
		out  []store.IssuedSVID
		next string
	)
	err := s.view("list svids", func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketSVIDExpiry).Cursor()
		first := func() (k, v []byte) {
			if start == nil {
				return c.First()
			}
			k, v = c.Seek(start)
			if after != nil && bytes.Equal(k, after) {
				k, v = c.Next()
			}
			return k, v
		}
		inRange := func(k []byte) bool { return k != nil && (!hasEnd || expiryKeyNanos(k) <= end) }

		// Count first, then decode into a slice of the exact size: a cursor
		// step costs far less than decoding a row, and growing a 100k-row
		// result by append would copy it over and over.
		n := 0
		k, _ := first()
		for ; inRange(k) && (q.PageSize == 0 || n < q.PageSize); k, _ = c.Next() {
			n++
		}
		more := inRange(k)

		out = make([]store.IssuedSVID, n)
		k, v := first()
		for i := range out {
			if i%4096 == 4095 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			if err := decodeSVIDInto(&out[i], v); err != nil {
				return fmt.Errorf("svid index key %x: %w", k, err)
			}
			if i == n-1 && more {
				next = hex.EncodeToString(k)
			}
			k, v = c.Next()
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	if len(out) == 0 {
		out = nil
	}
	return out, next, nil
}

// PruneSVIDs deletes rows whose NotAfter is before cutoff, from both the
// serial bucket and the expiry index, in one transaction.
func (s *Store) PruneSVIDs(ctx context.Context, cutoff time.Time) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if !nanosInRange(cutoff) {
		return 0, fmt.Errorf("prune svids: cutoff %s out of range: %w", cutoff, store.ErrInvalid)
	}
	end := cutoff.UnixNano()
	var n int
	err := s.updateAlways("prune svids", func(tx *bolt.Tx) error {
		idx, svids := tx.Bucket(bucketSVIDExpiry), tx.Bucket(bucketSVIDs)
		// Collect first, delete after: deleting under a live cursor is easy
		// to get subtly wrong in bbolt (Next after Delete can skip a key).
		var doomed [][]byte
		c := idx.Cursor()
		for k, _ := c.First(); k != nil && expiryKeyNanos(k) < end; k, _ = c.Next() {
			doomed = append(doomed, bytes.Clone(k))
		}
		for _, k := range doomed {
			if err := idx.Delete(k); err != nil {
				return err
			}
			if err := svids.Delete(k[expiryPrefixLen:]); err != nil {
				return err
			}
		}
		n = len(doomed)
		return nil
	})
	if err != nil {
		return 0, err
	}
	if n > 0 {
		s.log.Debug("pruned svid inventory", "rows", n, "cutoff", cutoff)
	}
	return n, nil
}

// LastSVIDNotAfter walks the expiry index from its newest row back until it
// has seen every one of caIDs (or the oldest row). bbolt has one writer, so
// the index is the whole truth and needs no second structure kept beside
// it; a CA found early (the active one, a retired one whose rows are the
// newest but for its successor's) costs a few rows.
func (s *Store) LastSVIDNotAfter(ctx context.Context, caIDs []string) (map[string]time.Time, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	want := make(map[string]bool, len(caIDs))
	for _, id := range caIDs {
		want[id] = true
	}
	out := map[string]time.Time{}
	err := s.view("last svid notafter", func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketSVIDExpiry).Cursor()
		var r store.IssuedSVID
		i := 0
		for k, v := c.Last(); k != nil && len(out) < len(want); k, v = c.Prev() {
			if i++; i%4096 == 0 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			if err := decodeSVIDInto(&r, v); err != nil {
				return fmt.Errorf("svid index key %x: %w", k, err)
			}
			if _, seen := out[r.CAID]; want[r.CAID] && !seen {
				// Rounded up as the etcd backend keeps it, so both
				// answer alike.
				t := r.NotAfter.Truncate(time.Second)
				if t.Before(r.NotAfter) {
					t = t.Add(time.Second)
				}
				out[r.CAID] = t
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
