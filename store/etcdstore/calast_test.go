package etcdstore

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// TestLastSVIDNotAfterBuildsOldStore: a prefix written before the CAs'
// last-NotAfter keys existed (rows only, no calastv1) gets them built from
// the rows on the first read, and keeps them up to date after.
func TestLastSVIDNotAfterBuildsOldStore(t *testing.T) {
	s := openShared(t, Options{})
	ctx := context.Background()
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for i, r := range []struct {
		ca string
		na time.Time
	}{{"ca-a", t0.Add(2 * time.Hour)}, {"ca-a", t0.Add(time.Hour)}, {"ca-b", t0.Add(3 * time.Hour)}} {
		rec := store.IssuedSVID{Serial: string(rune('a'+i)) + "0", SpiffeID: "spiffe://example.org/w", NotAfter: r.na, CAID: r.ca}
		if err := s.RecordSVID(ctx, rec); err != nil {
			t.Fatal(err)
		}
	}
	// As an older meshid left it.
	if _, err := s.cli.Delete(ctx, s.calastPrefix(), clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.cli.Delete(ctx, s.calastDone()); err != nil {
		t.Fatal(err)
	}
	got, err := s.LastSVIDNotAfter(ctx, []string{"ca-a", "ca-b", "ca-c"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !got["ca-a"].Equal(t0.Add(2*time.Hour)) || !got["ca-b"].Equal(t0.Add(3*time.Hour)) {
		t.Fatalf("LastSVIDNotAfter on an old store = %v, want ca-a +2h, ca-b +3h", got)
	}
	if r, err := s.cli.Get(ctx, s.calastDone()); err != nil || r.Count != 1 {
		t.Fatalf("calastv1 after the build: %v, %v", r, err)
	}
	// Pruning below a CA's keys drops them: the key space stays bounded.
	if _, err := s.PruneSVIDs(ctx, t0.Add(150*time.Minute)); err != nil {
		t.Fatal(err)
	}
	r, err := s.cli.Get(ctx, s.calastCA("ca-a"), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || r.Count != 0 {
		t.Fatalf("ca-a's keys after pruning its rows: %d, %v", r.Count, err)
	}
}

// TestLastSVIDNotAfterManyCAs: a group commit whose rows are of more CAs
// than a chunk transaction has room for is split, not refused by etcd's
// --max-txn-ops.
func TestLastSVIDNotAfterManyCAs(t *testing.T) {
	s := openShared(t, Options{})
	ctx := context.Background()
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	const cas, writers, each = 50, 10, 30
	want := map[string]time.Time{}
	var ids []string
	for i := range writers * each {
		ca := fmt.Sprintf("ca-%02d", i%cas)
		if na := t0.Add(time.Duration(i) * time.Second); na.After(want[ca]) {
			if _, ok := want[ca]; !ok {
				ids = append(ids, ca)
			}
			want[ca] = na
		}
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for j := range each {
				i := w*each + j
				rec := store.IssuedSVID{Serial: fmt.Sprintf("%08x", i), SpiffeID: "spiffe://example.org/w",
					NotAfter: t0.Add(time.Duration(i) * time.Second), CAID: fmt.Sprintf("ca-%02d", i%cas)}
				if err := s.RecordSVID(ctx, rec); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	got, err := s.LastSVIDNotAfter(ctx, ids)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if !got[id].Equal(want[id]) {
			t.Fatalf("LastSVIDNotAfter[%s] = %v, want %v (all: %v)", id, got[id], want[id], got)
		}
	}
}

func TestCalastFit(t *testing.T) {
	var c []*svidReq
	for i := range svidChunk {
		c = append(c, &svidReq{rec: store.IssuedSVID{CAID: fmt.Sprint(i % 3)}})
	}
	if n := calastFit(c); n != 62 {
		t.Fatalf("calastFit of 63 rows of 3 CAs = %d, want 62 (2*62+3 = 127)", n)
	}
	if n := calastFit(c[:40]); n != 40 {
		t.Fatalf("calastFit of 40 rows = %d", n)
	}
}
