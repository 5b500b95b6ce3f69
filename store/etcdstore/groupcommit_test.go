package etcdstore

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// TestOverlappingFlushes keeps one flush in etcd, holding a row too large
// for etcd to accept, while the other flights commit everything recorded
// meanwhile (including one serial recorded twice): those callers are all
// answered before the held flush ends, so flushes overlap; then the held
// flush fails, and only its own caller hears of it. No row is lost, none
// is committed twice, and Close waits for a flush still in flight.
func TestOverlappingFlushes(t *testing.T) {
	s := openShared(t, Options{})
	big := testSVID(1000)
	big.SpiffeID = "spiffe://example.org/" + strings.Repeat("x", 2<<20) // over etcd's request limit
	held, release := make(chan struct{}), make(chan struct{})
	// Set before the first RecordSVID: its kick orders this write before
	// every flush goroutine's read.
	s.gc.hold = func(batch []*svidReq) {
		if slices.ContainsFunc(batch, func(r *svidReq) bool { return r.rec.Serial == big.Serial }) {
			close(held)
			<-release
		}
	}
	bigErr := make(chan error, 1)
	go func() { bigErr <- s.RecordSVID(bg, big) }()
	<-held

	const n = 200
	errs := make([]error, n+1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = s.RecordSVID(bg, testSVID(i)) })
	}
	wg.Go(func() { errs[n] = s.RecordSVID(bg, testSVID(7)) }) // serial 7 twice
	answered := make(chan struct{})
	go func() { wg.Wait(); close(answered) }()
	select {
	case <-answered:
	case <-time.After(30 * time.Second): // a failure bound, not synchronisation
		close(release)
		t.Fatal("rows recorded while one flush was held were not committed: flushes do not overlap")
	}
	dups := 0
	for i, err := range errs {
		switch {
		case err == nil:
		case errors.Is(err, store.ErrAlreadyExists) && (i == 7 || i == n):
			dups++
		default:
			t.Errorf("row %d: %v", i, err)
		}
	}
	if dups != 1 {
		t.Errorf("serial 7 recorded twice: %d ErrAlreadyExists, want 1", dups)
	}
	select {
	case err := <-bigErr:
		t.Fatalf("held row answered before its flush ended: %v", err)
	default:
	}

	// Close while the held flush is still in etcd: it must wait for it,
	// and the flush's caller must still be answered.
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	waitFor(t, func() bool {
		s.gc.mu.Lock()
		defer s.gc.mu.Unlock()
		return s.gc.closed
	})
	select {
	case err := <-closed:
		t.Fatalf("Close returned while a flush was held: %v", err)
	default:
	}
	close(release)
	if err := <-bigErr; err == nil || errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("oversized row: %v, want etcd's refusal", err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}

	r := openSame(t, s, Options{})
	rows, _, err := r.ListSVIDs(bg, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]int{}
	for _, row := range rows {
		have[row.Serial]++
	}
	for i := range n {
		if sr := testSVID(i).Serial; have[sr] != 1 {
			t.Errorf("serial %s: %d rows, want 1", sr, have[sr])
		}
	}
	if len(rows) != n {
		t.Errorf("%d rows, want %d (the oversized one not among them)", len(rows), n)
	}
}
