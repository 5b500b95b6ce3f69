package etcdstore

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// TestPruneLeavesNoOrphanSerial: a row recorded by another replica
// between PruneSVIDs' listing and its delete, whose index key sorts inside
// the listed chunk, is either pruned whole or left whole; never its index
// key gone and its serial key left behind, and the count is what went.
func TestPruneLeavesNoOrphanSerial(t *testing.T) {
	s := openShared(t, Options{})
	other := openSame(t, s, Options{Replica: "other"})
	ctx := context.Background()
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	row := func(serial string, na time.Time) store.IssuedSVID {
		return store.IssuedSVID{Serial: serial, SpiffeID: "spiffe://example.org/w", NotAfter: na, CAID: "ca"}
	}
	for _, r := range []store.IssuedSVID{row("a1", t0.Add(time.Minute)), row("c3", t0.Add(3*time.Minute)), row("z9", t0.Add(time.Hour))} {
		if err := s.RecordSVID(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	var raced error
	s.pruneListed = func() {
		s.pruneListed = nil
		raced = other.RecordSVID(ctx, row("b2", t0.Add(2*time.Minute)))
	}
	n, err := s.PruneSVIDs(ctx, t0.Add(10*time.Minute))
	if err != nil || raced != nil {
		t.Fatalf("PruneSVIDs: %v; the racing RecordSVID: %v", err, raced)
	}
	if n != 2 {
		t.Errorf("PruneSVIDs = %d, want the 2 rows it listed", n)
	}
	idx, err := s.cli.Get(ctx, s.k.svidX, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	ser, err := s.cli.Get(ctx, s.k.svidS, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, kv := range idx.Kvs {
		have[string(kv.Key)] = true
	}
	for _, kv := range ser.Kvs {
		if !have[string(kv.Value)] {
			t.Errorf("serial key %s points at %s, which is gone", kv.Key, kv.Value)
		}
	}
	if len(idx.Kvs) != 2 || len(ser.Kvs) != 2 {
		t.Errorf("after the prune: %d index keys and %d serial keys, want 2 and 2 (b2 and z9)", len(idx.Kvs), len(ser.Kvs))
	}
	// The racer's row is whole: the next prune takes it, and it is listed.
	if n, err := s.PruneSVIDs(ctx, t0.Add(10*time.Minute)); err != nil || n != 1 {
		t.Fatalf("second PruneSVIDs = %d, %v; want 1 (b2)", n, err)
	}
}
