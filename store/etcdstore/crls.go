package etcdstore

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// PutCRLs replaces the signed CRL set, fenced as PutCAs is: only the
// leader's set is served by the others, so a replica that lost its lease
// must not replace it.
func (s *Store) PutCRLs(ctx context.Context, c store.SignedCRLs) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		return err
	}
	val, err := marshal(c)
	if err != nil {
		return fmt.Errorf("put crls: %w", err)
	}
	resp, err := s.txn(ctx, "put crls", []clientv3.Cmp{s.fence()}, []clientv3.Op{s.marker(), clientv3.OpPut(s.k.crls, val)})
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("put crls: %w", store.ErrNotLeader)
	}
	return nil
}

// GetCRLs returns the signed CRL set, or store.ErrNotFound.
func (s *Store) GetCRLs(ctx context.Context) (store.SignedCRLs, error) {
	var out store.SignedCRLs
	if err := s.check(ctx); err != nil {
		return out, err
	}
	v, _, ok, err := s.readOne(ctx, "get crls", s.k.crls)
	if err != nil {
		return out, err
	}
	if !ok {
		return out, fmt.Errorf("get crls: %w", store.ErrNotFound)
	}
	if err := unmarshal(v, &out); err != nil {
		return out, fmt.Errorf("get crls: %w", err)
	}
	return out, nil
}
