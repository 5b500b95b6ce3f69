package pcrsigner

import (
	"testing"
	"time"
)

// TestFairQueueRoundRobin: a node with a storm of requests does not hold
// back another node's one request: nodes are served in turn.
func TestFairQueueRoundRobin(t *testing.T) {
	q := newFairQueue(1000)
	for i := range 100 {
		q.Add("storm/"+string(rune('a'+i%26))+string(rune('a'+i/26)), "node-a")
	}
	q.Add("calm/one", "node-b")
	var order []string
	for range 3 {
		k, ok := q.Get()
		if !ok {
			t.Fatal("shut down")
		}
		order = append(order, k)
		q.Done(k)
	}
	if order[0] != "storm/aa" || order[1] != "calm/one" {
		t.Fatalf("served %v: node-b waited behind node-a's storm", order)
	}
	if q.Len() != 98 {
		t.Fatalf("len %d", q.Len())
	}
}

// TestFairQueueBoundAndDedup: the queue holds at most max keys, a key
// queued twice is there once, and one added while being processed comes
// back after Done, not to a second worker at once.
func TestFairQueueBoundAndDedup(t *testing.T) {
	q := newFairQueue(2)
	if !q.Add("a", "n") || !q.Add("a", "n") || !q.Add("b", "n") {
		t.Fatal("refused under the bound")
	}
	if q.Add("c", "n") {
		t.Fatal("accepted past the bound")
	}
	k, _ := q.Get()
	q.Add(k, "n") // while processing
	k2, _ := q.Get()
	if k2 == k {
		t.Fatal("a key in processing was handed out again")
	}
	q.Done(k2)
	q.Done(k)
	if k3, _ := q.Get(); k3 != k {
		t.Fatalf("got %q, want %q back after Done", k3, k)
	}
	q.ShutDown()
	if _, ok := q.Get(); ok {
		t.Fatal("Get after ShutDown")
	}
}

// TestRefreshAt: half-life with jitter, within the API server's window
// [notBefore+10m, notAfter-10m] even for the shortest lifetime.
func TestRefreshAt(t *testing.T) {
	nb := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	for _, life := range []time.Duration{time.Hour, 24 * time.Hour, 91 * 24 * time.Hour} {
		na := nb.Add(life)
		lo, mid, hi := RefreshAt(nb, na, 0), RefreshAt(nb, na, 0.5), RefreshAt(nb, na, 0.999)
		if !mid.Equal(nb.Add(life / 2).Truncate(time.Second)) {
			t.Fatalf("life %s: mid %s", life, mid)
		}
		if !lo.Before(mid) || !hi.After(mid) {
			t.Fatalf("life %s: no jitter: %s %s %s", life, lo, mid, hi)
		}
		if lo.Before(nb.Add(10*time.Minute)) || hi.After(na.Add(-10*time.Minute)) {
			t.Fatalf("life %s: %s..%s outside the window", life, lo, hi)
		}
	}
}
