package etcdstore

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/store"
)

// benchCluster is a 3-member cluster with fsync on: every row durable on a
// quorum, as in production.
func benchCluster(b *testing.B) *etcdtest.Cluster {
	b.Helper()
	return etcdtest.Start(b, 3)
}

func benchStore(b *testing.B, c *etcdtest.Cluster, replica string) *Store {
	b.Helper()
	s, err := Open(context.Background(), Options{Endpoints: c.Endpoints(), Prefix: "/bench/", Replica: replica, CompactInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

// BenchmarkRecordSVID measures inventory rows per second with 64 parallel
// callers per core group-committed into shared transactions.
func BenchmarkRecordSVID(b *testing.B) {
	c := benchCluster(b)
	s := benchStore(b, c, "bench")
	var seq atomic.Int64
	now := time.Now()
	b.SetParallelism(64)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := seq.Add(1)
			r := store.IssuedSVID{Serial: fmt.Sprintf("%032x", i), SpiffeID: "spiffe://example.org/bench", NotBefore: now,
				NotAfter: now.Add(time.Hour + time.Duration(i)*time.Millisecond), EntryID: "e", Requester: "unix:uid:1000", CAID: "ca", IssuedAt: now}
			if err := s.RecordSVID(context.Background(), r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "rows/s")
}

// BenchmarkPropagation measures an entry created on store A until store
// B's watch delivers it (two replicas on one 3-member cluster).
func BenchmarkPropagation(b *testing.B) {
	c := benchCluster(b)
	a := benchStore(b, c, "a")
	r := benchStore(b, c, "b")
	rev, err := r.Revision(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, err := r.Watch(ctx, rev)
	if err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("p%d-%d", b.N, i)
		start := time.Now()
		if err := a.CreateEntry(context.Background(), store.Entry{ID: id, SpiffeID: "spiffe://example.org/" + id, TTL: time.Hour}, store.AuditEvent{Actor: "bench", Action: "entry.create"}); err != nil {
			b.Fatal(err)
		}
		for got := false; !got; {
			select {
			case resp, ok := <-w.Responses():
				if !ok {
					b.Fatalf("watch ended: %v", w.Err())
				}
				for _, ev := range resp.Events {
					got = got || ev.Key == id
				}
			case <-time.After(10 * time.Second):
				b.Fatal("no event within 10s")
			}
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}
