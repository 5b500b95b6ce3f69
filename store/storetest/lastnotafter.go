package storetest

import (
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// caSVID is row i of CA caID expiring at notAfter.
func caSVID(i int, caID string, notAfter time.Time) store.IssuedSVID {
	r := svid(i, notAfter)
	r.CAID = caID
	return r
}

func wantLast(t *testing.T, s store.Store, what string, ids []string, want map[string]time.Time) {
	t.Helper()
	got, err := s.LastSVIDNotAfter(bg, ids)
	must(t, err)
	ok := len(got) == len(want)
	for id, w := range want {
		if g, found := got[id]; !found || !g.Equal(w) {
			ok = false
		}
	}
	if !ok {
		t.Fatalf("%s: LastSVIDNotAfter(%q) = %v, want %v", what, ids, got, want)
	}
}

// testLastSVIDNotAfter: the latest NotAfter per CA, among several CAs
// (one ID the other's prefix, one with a slash), rows recorded out of
// order, a sub-second NotAfter (rounded up), pruning, and concurrent
// writers.
func testLastSVIDNotAfter(t *testing.T, s store.Store) {
	all := []string{"ca-a", "ca-a2", "ca-a/x", "ca-b", "ca-none"}
	wantLast(t, s, "empty store", all, map[string]time.Time{})

	rows := []store.IssuedSVID{
		caSVID(1, "ca-a", t0.Add(time.Hour)),
		caSVID(2, "ca-a", t0.Add(3*time.Hour)),
		caSVID(3, "ca-a", t0.Add(2*time.Hour)),
		caSVID(4, "ca-a2", t0.Add(10*time.Minute)),
		caSVID(5, "ca-a/x", t0.Add(5*time.Hour)),
		caSVID(6, "ca-b", t0.Add(30*time.Minute)),
		caSVID(7, "ca-b", t0.Add(90*time.Minute+500*time.Millisecond)),
		caSVID(8, "ca-b", t0.Add(4*time.Hour)),
	}
	for _, r := range rows[:7] {
		must(t, s.RecordSVID(bg, r))
	}
	want := map[string]time.Time{
		"ca-a": t0.Add(3 * time.Hour), "ca-a2": t0.Add(10 * time.Minute), "ca-a/x": t0.Add(5 * time.Hour),
		"ca-b": t0.Add(90*time.Minute + time.Second),
	}
	wantLast(t, s, "rows of four CAs", all, want)
	wantLast(t, s, "one CA asked", []string{"ca-a"}, map[string]time.Time{"ca-a": t0.Add(3 * time.Hour)})
	wantLast(t, s, "no CA asked", nil, map[string]time.Time{})

	// A later row of ca-b moves it on; an earlier one of ca-a does not.
	must(t, s.RecordSVID(bg, rows[7]))
	must(t, s.RecordSVID(bg, caSVID(9, "ca-a", t0.Add(30*time.Minute))))
	want["ca-b"] = t0.Add(4 * time.Hour)
	wantLast(t, s, "after a later and an earlier row", all, want)

	// Pruning drops a CA whose rows are all gone, keeps the others.
	n, err := s.PruneSVIDs(bg, t0.Add(20*time.Minute))
	must(t, err)
	if n != 1 {
		t.Fatalf("PruneSVIDs = %d, want 1", n)
	}
	delete(want, "ca-a2")
	wantLast(t, s, "after pruning ca-a2's only row", all, want)
	_, err = s.PruneSVIDs(bg, t0.Add(4*time.Hour+30*time.Minute))
	must(t, err)
	wantLast(t, s, "after pruning all but ca-a/x's row", all, map[string]time.Time{"ca-a/x": t0.Add(5 * time.Hour)})
	_, err = s.PruneSVIDs(bg, t0.Add(6*time.Hour))
	must(t, err)
	wantLast(t, s, "after pruning every row", all, map[string]time.Time{})

	// Concurrent writers, rows of two CAs interleaved in one group commit.
	const writers, each = 8, 40
	var (
		wg sync.WaitGroup
		mu sync.Mutex
	)
	want = map[string]time.Time{}
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				k := 1000 + w*each + i
				ca := []string{"ca-c", "ca-d"}[k%2]
				na := t0.Add(7*time.Hour + time.Duration((k*7919)%3600)*time.Second)
				if err := s.RecordSVID(bg, caSVID(k, ca, na)); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if na.After(want[ca]) {
					want[ca] = na
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	ids := slices.Sorted(maps.Keys(want))
	wantLast(t, s, fmt.Sprintf("%d concurrent writers", writers), append(ids, "ca-a"), want)
}
