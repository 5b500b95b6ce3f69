package etcdstore

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// maxRetries bounds the read-modify-write loops; each conflict means
// another writer won, so only a key written in a tight loop by many
// replicas gets near it.
const maxRetries = 64

func marshal(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}

func unmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// roundTrip returns v as a read would return it.
func roundTrip[T any](v *T) (string, T, error) {
	var out T
	s, err := marshal(v)
	if err != nil {
		return "", out, err
	}
	err = unmarshal([]byte(s), &out)
	return s, out, err
}

func conflict(what string) error {
	return fmt.Errorf("%s: still conflicting after %d attempts: %w", what, maxRetries, store.ErrUnavailable)
}

// ---- CAs ----

// PutCA is PutCAs of one record.
func (s *Store) PutCA(ctx context.Context, rec store.CARecord, audit *store.AuditEvent) error {
	var audits []store.AuditEvent
	if audit != nil {
		audits = []store.AuditEvent{*audit}
	}
	return s.PutCAs(ctx, []store.CARecord{rec}, audits)
}

// PutCAs writes recs and audits in one transaction. It is fenced: a store
// holding the leadership writes only while its election key is still the
// one it won with; a store not holding it writes only while no replica
// campaigns at all (tools, a single replica before its first Campaign).
// Otherwise it fails with store.ErrNotLeader and writes nothing.
func (s *Store) PutCAs(ctx context.Context, recs []store.CARecord, audits []store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if len(recs) == 0 {
		return fmt.Errorf("put cas: no record: %w", store.ErrInvalid)
	}
	ops := []clientv3.Op{s.marker()}
	var ids []string
	for i := range recs {
		if recs[i].ID == "" {
			return fmt.Errorf("put ca: empty id: %w", store.ErrInvalid)
		}
		val, _, err := roundTrip(&recs[i])
		if err != nil {
			return fmt.Errorf("put ca %s: %w", recs[i].ID, err)
		}
		ops = append(ops, clientv3.OpPut(s.k.ca+recs[i].ID, val))
		ids = append(ids, recs[i].ID)
	}
	for i := range audits {
		var err error
		if ops, err = s.withAudit(ops, &audits[i]); err != nil {
			return err
		}
	}
	what := "put ca " + strings.Join(ids, ",")
	resp, err := s.txn(ctx, what, []clientv3.Cmp{s.fence()}, ops)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s: %w", what, store.ErrNotLeader)
	}
	return nil
}

// ListCAs returns every CA record, oldest CreatedAt first (ties by ID).
func (s *Store) ListCAs(ctx context.Context) ([]store.CARecord, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list cas", s.k.ca, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out, err := decodeAll[store.CARecord](resp)
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(out, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

func decodeAll[T any](resp *clientv3.GetResponse) ([]T, error) {
	var out []T
	for _, kv := range resp.Kvs {
		var v T
		if err := unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("%s: %w", kv.Key, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// ---- entries ----
