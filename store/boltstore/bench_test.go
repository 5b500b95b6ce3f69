package boltstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/meshid/meshid/store"
)

// BenchmarkRecordSVID measures durable group-commit throughput: every
// RecordSVID returns only after its row is fsynced. NotAfter is issuance time
// plus a fixed TTL, as in the server, so the expiry index is appended to in
// order; serials are random, as the CA makes them.
func BenchmarkRecordSVID(b *testing.B) {
	for _, writers := range []int{2, 8, 32, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			s := openOpts(b, filepath.Join(b.TempDir(), "meshid.db"), Options{})
			procs := runtime.GOMAXPROCS(0)
			// RunParallel starts parallelism*GOMAXPROCS goroutines.
			par := (writers + procs - 1) / procs
			b.SetParallelism(par)
			var seq atomic.Int64
			base := time.Now().Add(24 * time.Hour)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					n := seq.Add(1)
					if err := s.RecordSVID(ctx, benchSVID(n, base)); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric(float64(par*procs), "writers")
			b.ReportMetric(float64(b.N)/float64(max(s.commits.Load(), 1)), "rows/commit")
		})
	}
}

// BenchmarkListSVIDs100k reads the whole 100k-row inventory in expiry order.
func BenchmarkListSVIDs100k(b *testing.B) {
	const rows = 100_000
	s, _ := newStore(b)
	fillSVIDs(b, s.db, rows)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		got, next, err := s.ListSVIDs(ctx, store.SVIDQuery{})
		if err != nil || len(got) != rows || next != "" {
			b.Fatalf("ListSVIDs: %d rows, next %q, %v", len(got), next, err)
		}
	}
}

// BenchmarkOpen100k is the server's start-up path: open a store holding 100k
// entries and 100k inventory rows and load every entry. "warm" reopens with
// the file in the page cache (a restart); "cold" first asks the kernel to
// drop the file's cached pages (POSIX_FADV_DONTNEED), as after a reboot,
// without touching the rest of the machine's cache.
func BenchmarkOpen100k(b *testing.B) {
	const n = 100_000
	path := filepath.Join(b.TempDir(), "meshid.db")
	s, err := Open(path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	fillEntries(b, s.db, n)
	fillSVIDs(b, s.db, n)
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	if fi, err := os.Stat(path); err == nil {
		b.Logf("store file: %.1f MiB", float64(fi.Size())/(1<<20))
	}
	ctx := context.Background()
	for _, cold := range []bool{false, true} {
		b.Run(map[bool]string{false: "warm", true: "cold"}[cold], func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if cold {
					b.StopTimer()
					dropCache(b, path)
					b.StartTimer()
				}
				s, err := Open(path, Options{})
				if err != nil {
					b.Fatal(err)
				}
				es, _, err := s.ListEntries(ctx, store.EntryQuery{})
				if err != nil || len(es) != n {
					b.Fatalf("ListEntries: %d, %v", len(es), err)
				}
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func dropCache(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

func benchSVID(n int64, base time.Time) store.IssuedSVID {
	return store.IssuedSVID{
		Serial:    fmt.Sprintf("%016x%016x", rand.Uint64(), n),
		SpiffeID:  fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/sa%d", n%50, n%1000),
		NotBefore: base.Add(-24 * time.Hour),
		NotAfter:  time.Now().Add(24 * time.Hour),
		EntryID:   fmt.Sprintf("entry-%08d", n%1000),
		Requester: "unix:uid:1000",
		CAID:      "3f1a0c9e2b7d4e5f",
		IssuedAt:  base.Add(-24 * time.Hour),
	}
}

// fillSVIDs writes rows straight into the buckets in a few large
// transactions; going through RecordSVID would benchmark the setup.
func fillSVIDs(b *testing.B, db *bolt.DB, n int) {
	b.Helper()
	base := time.Now().Add(12 * time.Hour)
	const perTx = 20_000
	for start := 0; start < n; start += perTx {
		err := db.Update(func(tx *bolt.Tx) error {
			svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
			idx.FillPercent = expiryFillPercent
			for i := start; i < min(start+perTx, n); i++ {
				// Issued evenly over a day, as a day of renewals would be.
				rec := benchSVID(int64(i), base)
				rec.NotAfter = base.Add(time.Duration(i) * (24 * time.Hour / time.Duration(n)))
				if err := putInventoryRow(svids, idx, []byte(rec.Serial), expiryKey(rec.NotAfter, rec.Serial), encodeSVID(&rec)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

func fillEntries(b *testing.B, db *bolt.DB, n int) {
	b.Helper()
	const perTx = 20_000
	for start := 0; start < n; start += perTx {
		err := db.Update(func(tx *bolt.Tx) error {
			entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
			for i := start; i < min(start+perTx, n); i++ {
				e := store.Entry{
					ID:       fmt.Sprintf("%016x-%08d", rand.Uint64(), i),
					SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/sa%d", i%500, i),
					Selectors: []store.Selector{
						{Type: "k8s", Value: fmt.Sprintf("ns:ns%d", i%500)},
						{Type: "k8s", Value: fmt.Sprintf("sa:sa%d", i)},
					},
					TTL:       24 * time.Hour,
					DNSNames:  []string{fmt.Sprintf("sa%d.ns%d.svc", i, i%500)},
					CreatedAt: time.Now(),
				}
				if err := entries.Put([]byte(e.ID), encodeEntry(&e)); err != nil {
					return err
				}
				if err := uniq.Put(uniqKey(&e), []byte(e.ID)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}
