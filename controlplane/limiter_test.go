package controlplane

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

func TestSignLimiterRefusesBeyondTheQueue(t *testing.T) {
	ctx := context.Background()
	// Concurrency: one slot; a second request waits up to maxWait, then is
	// refused.
	l := newSignLimiter(1, 0, time.Second)
	_, release, err := l.acquire(ctx, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.acquire(ctx, 20*time.Millisecond); !errors.Is(err, ErrSignBusy) {
		t.Fatalf("second acquire with the slot held: %v, want ErrSignBusy", err)
	}
	release()
	if _, release2, err := l.acquire(ctx, 20*time.Millisecond); err != nil {
		t.Fatalf("acquire after release: %v", err)
	} else {
		release2()
	}

	// Rate: 10/s with a one-second burst: 10 at once, then one per 100 ms;
	// with a 250 ms queue the 13th waits 200 ms and the 14th is refused.
	l = newSignLimiter(0, 10, time.Second)
	now := time.Now()
	var waits []time.Duration
	for i := range 14 {
		at, _, err := l.reserve(now, 250*time.Millisecond)
		if i == 13 {
			if !errors.Is(err, ErrSignBusy) {
				t.Fatalf("14th reservation: %v, want ErrSignBusy", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("reservation %d: %v", i+1, err)
		}
		waits = append(waits, max(at.Sub(now), 0))
	}
	if waits[9] != 0 || waits[10] != 0 || waits[11] != 100*time.Millisecond || waits[12] != 200*time.Millisecond {
		t.Fatalf("waits %v: want a burst of 11 free, then 100ms steps", waits)
	}
}

// TestSignLimiterAbandonedWaitReturnsItsToken: a request that gives up
// while queued for a rate token (its client went away, its deadline passed)
// must hand the token back, or a burst of abandoned renewals would push
// every later request further out and turn into ResourceExhausted.
func TestSignLimiterAbandonedWaitReturnsItsToken(t *testing.T) {
	// 1/s: a bucket of two, then one token a second.
	l := newSignLimiter(0, 1, time.Minute)
	for range 2 {
		_, release, err := l.acquire(context.Background(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		release()
	}
	// The next token is a second out; this caller gives up after 50 ms.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := l.acquire(ctx, time.Minute); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("abandoned acquire: %v, want DeadlineExceeded", err)
	}
	// Had the abandoned request kept its token, the next would wait ~2s.
	now := time.Now()
	at, _, err := l.reserve(now, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if wait := at.Sub(now); wait > 1500*time.Millisecond {
		t.Fatalf("next request waits %s after an abandoned one: its token was not given back", wait)
	}
}

// BenchmarkReissueAfterActivation measures a mass re-issue: N workloads
// each hold an SVID; a CA activation with RotateSVIDsOnActivation
// re-issues all of them through the signing limits. Reported: the time
// until the last one has its new SVID, and the p50/p99 per-SVID delay.
func BenchmarkReissueAfterActivation(b *testing.B) {
	for _, tc := range []struct {
		n    int
		rate float64
	}{{10000, 0}, {10000, 2000}} {
		b.Run(fmt.Sprintf("svids=%d/rate=%g", tc.n, tc.rate), func(b *testing.B) {
			for range b.N {
				reissue(b, tc.n, tc.rate)
			}
		})
	}
}

func reissue(b *testing.B, n int, rate float64) {
	b.StopTimer()
	srv, err := Open(context.Background(), Config{DataDir: b.TempDir(), RotateSVIDsOnActivation: true, SignRate: rate, DisableAutoRotate: true})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	subs := make([]identity.Subscription, n)
	sel := func(i int) store.Selector { return store.Selector{Type: "unix", Value: fmt.Sprintf("uid:%d", 10000+i)} }
	// All entries first, then the subscribers: each CreateEntry re-matches
	// every subscriber, so interleaving them made the (untimed) set-up
	// quadratic, minutes of CPU that drowned the timed part in a profile.
	for i := range n {
		if _, err := srv.CreateEntry(ctx, EntrySpec{SpiffeID: fmt.Sprintf("spiffe://cluster.local/w/%d", i), Selectors: []store.Selector{sel(i)}}, "bench"); err != nil {
			b.Fatal(err)
		}
	}
	for i := range n {
		if subs[i], err = srv.Subscribe(ctx, identity.Caller{Selectors: []string{SelectorString(sel(i))}}); err != nil {
			b.Fatal(err)
		}
	}
	defer func() {
		for _, s := range subs {
			s.Close()
		}
	}()
	if _, err := srv.PrepareCA(ctx, "bench"); err != nil {
		b.Fatal(err)
	}
	newCA := srv.preparedCA().cert
	signedByNew := func(s identity.Subscription) bool {
		snap := s.Snapshot()
		return len(snap.SVIDs) > 0 && snap.SVIDs[0].Certs[0].CheckSignatureFrom(newCA) == nil
	}
	delays := make([]time.Duration, n)
	var wg sync.WaitGroup
	b.StartTimer()
	start := time.Now()
	for i, s := range subs {
		wg.Go(func() {
			for !signedByNew(s) {
				<-s.Changed()
			}
			delays[i] = time.Since(start)
		})
	}
	if _, err := srv.ActivateCA(ctx, "bench", true); err != nil {
		b.Fatal(err)
	}
	wg.Wait()
	b.StopTimer()
	slices.Sort(delays)
	b.ReportMetric(delays[n-1].Seconds(), "s-all-reissued")
	b.ReportMetric(delays[n/2].Seconds(), "s-p50")
	b.ReportMetric(delays[n*99/100].Seconds(), "s-p99")

}
