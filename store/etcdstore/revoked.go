package etcdstore

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// revokeChunk serials per transaction: each costs a compare and a put.
const revokeChunk = 120

// RevokeSerials adds serials to the revocation list with one audit event.
// Up to revokeChunk serials go in one transaction; a longer list is
// written in several, the audit event with the last.
func (s *Store) RevokeSerials(ctx context.Context, serials []store.RevokedSerial, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	for _, r := range serials {
		if r.Serial == "" || len(r.Serial) > 128 || r.NotAfter.IsZero() {
			return fmt.Errorf("revoke: serial and expiry are required: %w", store.ErrInvalid)
		}
	}
	chunks := slices.Collect(slices.Chunk(serials, revokeChunk))
	if len(chunks) == 0 {
		chunks = [][]store.RevokedSerial{nil}
	}
	for i, c := range chunks {
		var au *store.AuditEvent
		if i == len(chunks)-1 {
			au = &audit
		}
		if err := s.revokeChunk(ctx, c, au); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) revokeChunk(ctx context.Context, serials []store.RevokedSerial, audit *store.AuditEvent) error {
	for range maxRetries {
		gets := make([]clientv3.Op, len(serials))
		for i, r := range serials {
			gets[i] = clientv3.OpGet(s.k.revoked+r.Serial, clientv3.WithCountOnly())
		}
		var exist []bool
		if len(gets) > 0 {
			resp, err := s.txn(ctx, "revoke serials", nil, gets)
			if err != nil {
				return err
			}
			for _, r := range resp.Responses {
				exist = append(exist, r.GetResponseRange().Count > 0)
			}
		}
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		seen := map[string]bool{}
		for i, r := range serials {
			if exist[i] || seen[r.Serial] {
				continue // the first record stays
			}
			seen[r.Serial] = true
			val, _, err := roundTrip(&r)
			if err != nil {
				return err
			}
			k := s.k.revoked + r.Serial
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
			ops = append(ops, clientv3.OpPut(k, val))
		}
		if len(ops) > 0 {
			ops = append(ops, s.marker())
		}
		ops, err := s.withAudit(ops, audit)
		if err != nil {
			return err
		}
		if len(ops) == 0 {
			return nil
		}
		resp, err := s.txn(ctx, "revoke serials", cmps, ops)
		if err != nil {
			return err
		}
		if resp.Succeeded {
			return nil
		}
	}
	return conflict("revoke serials")
}

// ListRevoked returns every revoked serial not yet pruned.
func (s *Store) ListRevoked(ctx context.Context) ([]store.RevokedSerial, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list revoked", s.k.revoked, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	return decodeAll[store.RevokedSerial](resp)
}

// PruneRevoked drops serials whose certificate expired before cutoff.
func (s *Store) PruneRevoked(ctx context.Context, cutoff time.Time) (int, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	resp, err := s.get(ctx, "prune revoked", s.k.revoked, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	var doomed []string
	for _, kv := range resp.Kvs {
		var r store.RevokedSerial
		if err := unmarshal(kv.Value, &r); err != nil {
			return 0, fmt.Errorf("prune revoked: %s: %w", kv.Key, err)
		}
		if r.NotAfter.Before(cutoff) {
			doomed = append(doomed, string(kv.Key))
		}
	}
	return s.deleteKeys(ctx, "prune revoked", doomed)
}

// NextCRLNumber returns max(floor, previous+1) for caID and persists it,
// a compare-and-swap on the counter's ModRevision.
func (s *Store) NextCRLNumber(ctx context.Context, caID string, floor int64) (int64, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	if caID == "" || floor < 0 {
		return 0, fmt.Errorf("next crl number: empty ca id or negative floor: %w", store.ErrInvalid)
	}
	what := "next crl number for " + caID
	key := s.k.crl + caID
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, key)
		if err != nil {
			return 0, err
		}
		n := floor
		if ok {
			prev, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: stored %q: %w", what, v, err)
			}
			if prev == 1<<63-1 {
				return 0, fmt.Errorf("crl number of %s is exhausted", caID)
			}
			n = max(floor, prev+1)
		}
		resp, err := s.txn(ctx, what, []clientv3.Cmp{unchangedCmp(key, rev)}, []clientv3.Op{clientv3.OpPut(key, strconv.FormatInt(n, 10))})
		if err != nil {
			return 0, err
		}
		if resp.Succeeded {
			return n, nil
		}
	}
	return 0, conflict(what)
}

// ---- agents ----
