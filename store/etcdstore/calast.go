package etcdstore

import (
	"context"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// The latest NotAfter per CA is kept beside the inventory so that a
// starting server need not decode every row to learn how long a retired
// CA stays in the bundle (that decode was most of a start-up against 100k
// rows):
//
//	p calast/<hex CA ID>/<NotAfter in seconds, 16 hex>   ""
//	p calastv1                                            "" (keys complete)
//
// Each inventory chunk transaction also puts one key per CA in it, for
// the chunk's latest NotAfter rounded up to the second: the greatest key
// of a CA is then its latest row's, and the number of keys a CA has is
// bounded by the seconds its live rows expire in. PruneSVIDs drops the
// keys below its cutoff: every row such a key stands for is older. The CA
// ID is hex so that one CA's keys are never inside another's range.
// Stores written before these keys existed have rows without them:
// calastv1 is absent there, and the first LastSVIDNotAfter builds them
// from the rows once.

func (s *Store) calastPrefix() string { return s.k.p + "calast/" }
func (s *Store) calastDone() string   { return s.k.p + "calastv1" }

func (s *Store) calastCA(caID string) string {
	return s.calastPrefix() + hex.EncodeToString([]byte(caID)) + "/"
}

// ceilSec is t in unix seconds, rounded up.
func ceilSec(t time.Time) int64 {
	sec := t.Unix()
	if t.Nanosecond() > 0 {
		sec++
	}
	return sec
}

func (s *Store) calastKey(caID string, notAfter time.Time) string {
	return s.calastCA(caID) + fmt.Sprintf("%016x", uint64(ceilSec(notAfter))^(1<<63))
}

// calastOps are the puts recording rows' latest NotAfter: one per CA.
func (s *Store) calastOps(rows func(yield func(*store.IssuedSVID) bool)) []clientv3.Op {
	latest := map[string]time.Time{}
	for r := range rows {
		if t, ok := latest[r.CAID]; !ok || r.NotAfter.After(t) {
			latest[r.CAID] = r.NotAfter
		}
	}
	ops := make([]clientv3.Op, 0, len(latest))
	for id, t := range latest {
		ops = append(ops, clientv3.OpPut(s.calastKey(id, t), ""))
	}
	return ops
}

// chunkRows yields the rows of a group-commit chunk.
func chunkRows(c []*svidReq) func(yield func(*store.IssuedSVID) bool) {
	return func(yield func(*store.IssuedSVID) bool) {
		for _, r := range c {
			if !yield(&r.rec) {
				return
			}
		}
	}
}

// maxTxnOps is etcd's default --max-txn-ops.
const maxTxnOps = 128

// calastFit is how many of c's first rows fit one transaction: two puts
// a row and one per CA among them. svidChunk leaves room for two CAs (the
// old and the new one around an activation); more is split off.
func calastFit(c []*svidReq) int {
	cas := map[string]bool{}
	for i, r := range c {
		cas[r.rec.CAID] = true
		if 2*(i+1)+len(cas) > maxTxnOps {
			return i
		}
	}
	return len(c)
}

// LastSVIDNotAfter reads, in one transaction, each CA's greatest key.
func (s *Store) LastSVIDNotAfter(ctx context.Context, caIDs []string) (map[string]time.Time, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	out := map[string]time.Time{}
	for len(caIDs) > 0 {
		ids := caIDs[:min(len(caIDs), maxTxnOps-1)]
		caIDs = caIDs[len(ids):]
		ops := []clientv3.Op{clientv3.OpGet(s.calastDone(), clientv3.WithCountOnly())}
		for _, id := range ids {
			p := s.calastCA(id)
			ops = append(ops, clientv3.OpGet(p, clientv3.WithRange(clientv3.GetPrefixRangeEnd(p)), clientv3.WithKeysOnly(),
				clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(1)))
		}
		resp, err := s.txn(ctx, "last svid notafter", nil, ops)
		if err != nil {
			return nil, err
		}
		if resp.Responses[0].GetResponseRange().Count == 0 {
			if err := s.buildCalast(ctx); err != nil {
				return nil, err
			}
			return s.LastSVIDNotAfter(ctx, append(ids, caIDs...))
		}
		for i, id := range ids {
			kvs := resp.Responses[i+1].GetResponseRange().Kvs
			if len(kvs) == 0 {
				continue
			}
			k := strings.TrimPrefix(string(kvs[0].Key), s.calastCA(id))
			b, err := hex.DecodeString(k)
			if err != nil || len(b) != 8 {
				return nil, fmt.Errorf("last svid notafter: malformed key %q", kvs[0].Key)
			}
			var u uint64
			for _, x := range b {
				u = u<<8 | uint64(x)
			}
			out[id] = time.Unix(int64(u^(1<<63)), 0).UTC()
		}
	}
	return out, nil
}

// buildCalast writes the keys for every row of a store written before
// they existed, then calastv1. Writers running meanwhile put their own
// keys, and these puts are idempotent, so replicas doing it at once agree.
func (s *Store) buildCalast(ctx context.Context) error {
	var ops []clientv3.Op
	tok := ""
	for {
		rows, next, err := s.ListSVIDs(ctx, store.SVIDQuery{PageSize: 5000, PageToken: tok})
		if err != nil {
			return fmt.Errorf("build ca last-notafter keys: %w", err)
		}
		ops = append(ops, s.calastOps(func(yield func(*store.IssuedSVID) bool) {
			for i := range rows {
				if !yield(&rows[i]) {
					return
				}
			}
		})...)
		if tok = next; tok == "" {
			break
		}
	}
	ops = append(ops, clientv3.OpPut(s.calastDone(), ""))
	for len(ops) > 0 {
		n := min(len(ops), maxTxnOps)
		if _, err := s.txn(ctx, "build ca last-notafter keys", nil, ops[:n]); err != nil {
			return err
		}
		ops = ops[n:]
	}
	s.log.Info("built the CAs' last-notafter keys from the inventory")
	return nil
}

// pruneCalast drops every CA's keys below cutoff: the CAs are found by
// skipping from one CA's range to the next, one small read each.
func (s *Store) pruneCalast(ctx context.Context, cutoff time.Time) error {
	p := s.calastPrefix()
	end := clientv3.GetPrefixRangeEnd(p)
	from := p
	// A key below cutoff's second rounded up stands for rows all before
	// cutoff, so all pruned.
	below := fmt.Sprintf("%016x", uint64(ceilSec(cutoff))^(1<<63))
	for {
		resp, err := s.get(ctx, "prune ca last-notafter keys", from, clientv3.WithRange(end), clientv3.WithKeysOnly(), clientv3.WithLimit(1))
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		k := string(resp.Kvs[0].Key)
		hexID, _, ok := strings.Cut(k[len(p):], "/")
		if !ok {
			return fmt.Errorf("prune ca last-notafter keys: malformed key %q", k)
		}
		ca := p + hexID + "/"
		if _, err := s.txn(ctx, "prune ca last-notafter keys", nil, []clientv3.Op{clientv3.OpDelete(ca, clientv3.WithRange(ca+below))}); err != nil {
			return err
		}
		from = clientv3.GetPrefixRangeEnd(ca)
	}
}
