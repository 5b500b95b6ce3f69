package etcdstore

import (
	"context"
	"fmt"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// CreateToken stores a join token with its audit event.
func (s *Store) CreateToken(ctx context.Context, t store.JoinToken, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if t.Hash == "" || t.SpiffeID == "" || t.ExpiresAt.IsZero() {
		return fmt.Errorf("create token: hash, spiffe id and expiry are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&t)
	if err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	tk := s.k.token + t.Hash
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(tk, val), s.marker()}, &audit)
	if err != nil {
		return err
	}
	resp, err := s.txn(ctx, "create token", []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(tk), "=", 0)}, ops)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("token: %w", store.ErrAlreadyExists)
	}
	return nil
}

// redeemable is the token as UseToken would redeem it, or ErrNotFound.
func redeemable(v []byte, ok bool, now time.Time, conn string) (store.JoinToken, error) {
	if !ok {
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	var t store.JoinToken
	if err := unmarshal(v, &t); err != nil {
		return t, fmt.Errorf("token: %w", err)
	}
	if !now.Before(t.ExpiresAt) || (t.SingleUse && (conn == "" || (!t.UsedAt.IsZero() && t.BoundTo != conn))) {
		// Expired and spent tokens look like unknown ones.
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	return t, nil
}

// spend returns the token as redeemed and the op writing it (none when
// the redemption needs no write).
func spend(t store.JoinToken, key string, now time.Time, conn string) (store.JoinToken, []clientv3.Op, error) {
	if !t.SingleUse || !t.UsedAt.IsZero() {
		return t, nil, nil
	}
	t.UsedAt, t.BoundTo = now, conn
	val, out, err := roundTrip(&t)
	if err != nil {
		return store.JoinToken{}, nil, err
	}
	return out, []clientv3.Op{clientv3.OpPut(key, val)}, nil
}

// UseToken redeems a token; a single-use token's first use is a
// transaction on the token's ModRevision, so of two concurrent redemptions
// on any replicas one wins.
func (s *Store) UseToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, err
	}
	tk := s.k.token + hash
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, "use token", tk)
		if err != nil {
			return store.JoinToken{}, err
		}
		t, err := redeemable(v, ok, now, conn)
		if err != nil {
			return store.JoinToken{}, err
		}
		out, ops, err := spend(t, tk, now, conn)
		if err != nil || len(ops) == 0 {
			return out, err
		}
		resp, err := s.txn(ctx, "use token", []clientv3.Cmp{unchangedCmp(tk, rev)}, append(ops, s.marker()))
		if err != nil {
			return store.JoinToken{}, err
		}
		if resp.Succeeded {
			return out, nil
		}
	}
	return store.JoinToken{}, conflict("use token")
}

// PeekToken is UseToken without the write.
func (s *Store) PeekToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, err
	}
	v, _, ok, err := s.getOne(ctx, "use token", s.k.token+hash)
	if err != nil {
		return store.JoinToken{}, err
	}
	return redeemable(v, ok, now, conn)
}

// deleteChunk is how many keys one deleting transaction removes: under
// etcd's default --max-txn-ops of 128 with room for the marker and audit.
const deleteChunk = 100

// deleteKeys deletes keys in transactions of deleteChunk (each with the
// watch marker) and returns how many existed.
func (s *Store) deleteKeys(ctx context.Context, what string, keys []string) (int, error) {
	n := 0
	for c := range slices.Chunk(keys, deleteChunk) {
		ops := make([]clientv3.Op, 0, len(c)+1)
		for _, k := range c {
			ops = append(ops, clientv3.OpDelete(k))
		}
		resp, err := s.txn(ctx, what, nil, append(ops, s.marker()))
		if err != nil {
			return n, err
		}
		for _, r := range resp.Responses[:len(c)] {
			n += int(r.GetResponseDeleteRange().Deleted)
		}
	}
	return n, nil
}

// DeleteTokensFor deletes every join token granting spiffeID.
func (s *Store) DeleteTokensFor(ctx context.Context, spiffeID string) (int, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	resp, err := s.get(ctx, "delete tokens", s.k.token, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	var doomed []string
	for _, kv := range resp.Kvs {
		var t store.JoinToken
		if err := unmarshal(kv.Value, &t); err != nil {
			return 0, fmt.Errorf("delete tokens: %s: %w", kv.Key, err)
		}
		if t.SpiffeID == spiffeID {
			doomed = append(doomed, string(kv.Key))
		}
	}
	return s.deleteKeys(ctx, "delete tokens", doomed)
}

// ---- revocations ----
