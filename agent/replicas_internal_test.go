package agent

import (
	"slices"
	"testing"
	"time"
)

// Agents given the same list start at every replica about as often, so a
// fleet spreads over the replicas; a session tries them all, the start
// first, in list order around the ring.
func TestRingStartsAtRandom(t *testing.T) {
	servers := []string{"r1:8443", "r2:8443", "r3:8443"}
	starts := map[string]int{}
	const agents = 3000
	for range agents {
		r := newRing(servers)
		o := r.order()
		starts[o[0]]++
		i := slices.Index(servers, o[0])
		if want := append(slices.Clone(servers[i:]), servers[:i]...); !slices.Equal(o, want) {
			t.Fatalf("order %v, want %v", o, want)
		}
	}
	for _, s := range servers {
		// 1000 expected; below 800 is about 10 standard deviations off.
		if starts[s] < 800 {
			t.Fatalf("%d of %d agents start at %s: not spread (%v)", starts[s], agents, s, starts)
		}
	}
}

// A replica that is lost or refuses moves the next session to the next
// one at once; the backoff comes only once every replica failed in a row
// (or a session reached none), and a replica that held its session long
// starts the count afresh. One server backs off after every failure, as
// before replicas.
func TestNextRoundBacksOffAfterAFullRound(t *testing.T) {
	a := &Agent{ring: ring{servers: []string{"r1:1", "r2:1", "r3:1"}}}
	missed := 0
	step := func(reached string, synced bool, held time.Duration, wantBackoff bool, wantNext string) {
		t.Helper()
		if got := a.nextRound(reached, synced, held, &missed); got != wantBackoff {
			t.Fatalf("after %q (synced %v, held %s): backoff %v, want %v", reached, synced, held, got, wantBackoff)
		}
		if got := a.ring.order()[0]; got != wantNext {
			t.Fatalf("after %q: next %s, want %s", reached, got, wantNext)
		}
	}
	step("r1:1", true, time.Hour, false, "r2:1")        // lost after a long session: on to r2
	step("r2:1", false, 0, false, "r3:1")               // r2 refuses (Unavailable): r3
	step("r3:1", false, 0, true, "r1:1")                // r3 too: a full round failed
	step("", false, 0, true, "r1:1")                    // none reached: a full round in itself
	step("r1:1", true, time.Millisecond, false, "r2:1") // synced, dropped at once
	step("r2:1", true, time.Millisecond, false, "r3:1") // again
	step("r3:1", true, time.Millisecond, true, "r1:1")  // all of them accept and drop: back off
	step("r1:1", true, stableSession, false, "r2:1")    // a session that held resets the count
	step("r2:1", false, 0, false, "r3:1")

	one := &Agent{ring: ring{servers: []string{"s:1"}}}
	for _, reached := range []string{"s:1", ""} {
		if !one.nextRound(reached, true, time.Hour, &missed) {
			t.Fatalf("one server, after %q: no backoff", reached)
		}
	}
}
