package boltstore

import (
	"context"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

const (
	tokenV1 byte = 1
	// tokenV2 appends the binding; tokens without one stay v1.
	tokenV2 byte = 2
)

func encodeToken(t *store.JoinToken) []byte {
	e := enc{b: make([]byte, 0, 64+len(t.Hash)+len(t.SpiffeID)+len(t.BoundTo))}
	if t.BoundTo != "" {
		e.byte1(tokenV2)
	} else {
		e.byte1(tokenV1)
	}
	e.str(t.Hash)
	e.str(t.SpiffeID)
	e.time(t.ExpiresAt)
	if t.SingleUse {
		e.byte1(1)
	} else {
		e.byte1(0)
	}
	e.time(t.UsedAt)
	e.time(t.CreatedAt)
	if t.BoundTo != "" {
		e.str(t.BoundTo)
	}
	return e.b
}

func decodeToken(v []byte) (store.JoinToken, error) {
	var t store.JoinToken
	d := dec{s: string(v)}
	ver := tokenV1
	if len(v) > 0 && v[0] == tokenV2 {
		ver = tokenV2
	}
	if err := d.version("token", ver); err != nil {
		return t, err
	}
	t.Hash = d.str()
	t.SpiffeID = d.str()
	t.ExpiresAt = d.time()
	t.SingleUse = d.byte1() == 1
	t.UsedAt = d.time()
	t.CreatedAt = d.time()
	if ver == tokenV2 {
		t.BoundTo = d.str()
	}
	return t, d.finish("token")
}

// CreateToken stores a join token with its audit event in one transaction.
func (s *Store) CreateToken(ctx context.Context, t store.JoinToken, audit store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if t.Hash == "" || t.SpiffeID == "" || t.ExpiresAt.IsZero() {
		return fmt.Errorf("create token: hash, spiffe id and expiry are required: %w", store.ErrInvalid)
	}
	val := encodeToken(&t)
	stored, err := decodeToken(val)
	if err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	return s.commitWatched("create token", true, func(tx *bolt.Tx, ch *changes) error {
		b := tx.Bucket(bucketTokens)
		if b.Get([]byte(t.Hash)) != nil {
			return fmt.Errorf("token: %w", store.ErrAlreadyExists)
		}
		if err := b.Put([]byte(t.Hash), val); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindToken, Op: store.OpPut, Key: t.Hash, Token: &stored})
		return s.appendAudit(tx, audit)
	})
}

// readToken is the token hash as UseToken would redeem it for conn at now,
// read in tx; ErrNotFound if it would refuse it.
func readToken(tx *bolt.Tx, hash string, now time.Time, conn string) (store.JoinToken, error) {
	v := tx.Bucket(bucketTokens).Get([]byte(hash))
	if v == nil {
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	t, err := decodeToken(v)
	if err != nil {
		return t, err
	}
	if !now.Before(t.ExpiresAt) || (t.SingleUse && (conn == "" || (!t.UsedAt.IsZero() && t.BoundTo != conn))) {
		// Expired and spent tokens look like unknown ones: a caller
		// learns nothing by probing.
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	return t, nil
}

// spendToken redeems token hash for conn at now in tx, as UseToken does,
// and records the watch event if it wrote.
func spendToken(tx *bolt.Tx, ch *changes, hash string, now time.Time, conn string) (store.JoinToken, error) {
	t, err := readToken(tx, hash, now, conn)
	if err != nil || !t.SingleUse || !t.UsedAt.IsZero() {
		// Refused, reusable, or used before on this connection: nothing
		// to write.
		return t, err
	}
	t.UsedAt, t.BoundTo = now, conn
	val := encodeToken(&t)
	out, err := decodeToken(val)
	if err != nil {
		return store.JoinToken{}, err
	}
	used := out
	ch.add(store.Event{Kind: store.KindToken, Op: store.OpPut, Key: hash, Token: &used})
	return out, tx.Bucket(bucketTokens).Put([]byte(hash), val)
}

// UseToken redeems a token; see store.Store.
func (s *Store) UseToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	out, err := s.PeekToken(ctx, hash, now, conn)
	// A reusable token needs no write: redeem it in a read transaction, so
	// proxies reconnecting do not cost an fsync each.
	if err != nil || !out.SingleUse || !out.UsedAt.IsZero() {
		// Reusable, or used before on this connection: nothing to write.
		return out, err
	}
	err = s.commitWatched("use token", true, func(tx *bolt.Tx, ch *changes) error {
		var err error
		out, err = spendToken(tx, ch, hash, now, conn) // again, under the writer lock: one winner
		return err
	})
	return out, err
}

// PeekToken is UseToken without the write; see store.Store.
func (s *Store) PeekToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	if err := ctx.Err(); err != nil {
		return store.JoinToken{}, err
	}
	var out store.JoinToken
	err := s.view("use token", func(tx *bolt.Tx) error {
		var err error
		out, err = readToken(tx, hash, now, conn)
		return err
	})
	return out, err
}

// DeleteTokensFor deletes every join token granting spiffeID.
func (s *Store) DeleteTokensFor(ctx context.Context, spiffeID string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	n := 0
	err := s.commitWatched("delete tokens", false, func(tx *bolt.Tx, ch *changes) error {
		var err error
		n, err = deleteWhere(tx.Bucket(bucketTokens), func(v []byte) (bool, error) {
			t, err := decodeToken(v)
			ok := err == nil && t.SpiffeID == spiffeID
			if ok {
				ch.add(store.Event{Kind: store.KindToken, Op: store.OpDelete, Key: t.Hash, Token: &t})
			}
			return ok, err
		})
		return err
	})
	return n, err
}
