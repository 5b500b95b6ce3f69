package lifecycle

import (
	"strings"
	"testing"

	"github.com/meshid/meshid/store"
)

// The 300-hour CA activates its successor at 200 h: a margin of 100 h, so
// the deadline is at 250 h and the last resort at 275 h.
func TestGateAt(t *testing.T) {
	active := activeCA()
	prepared := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(150), NotAfter: h(450)}
	late := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(190), NotAfter: h(490)} // due at 238 h: margin 62 h
	for _, tc := range []struct {
		name     string
		now      float64
		prepared CA
		c        Convergence
		min      float64
		want     Gate
	}{
		{"no agents: nothing to wait for", 200, prepared, Convergence{}, 1, GateOpen},
		{"all streams hold it", 200, prepared, Convergence{Holding: 10, Streams: 10}, 1, GateOpen},
		{"one stream lags", 200, prepared, Convergence{Holding: 9, Streams: 10}, 1, GateHeld},
		{"one stream lags, 90% asked", 200, prepared, Convergence{Holding: 9, Streams: 10}, 0.9, GateOpen},
		{"two lag, 90% asked", 200, prepared, Convergence{Holding: 8, Streams: 10}, 0.9, GateHeld},
		{"gating off", 200, prepared, Convergence{Holding: 0, Streams: 10}, 0, GateOpen},
		{"just before the deadline", 249.9, prepared, Convergence{Holding: 3, Streams: 10}, 1, GateHeld},
		{"at the deadline", 250, prepared, Convergence{Holding: 3, Streams: 10}, 1, GatePastDeadline},
		{"just before the last resort", 274.9, prepared, Convergence{Holding: 3, Streams: 10}, 1, GatePastDeadline},
		{"last resort", 275, prepared, Convergence{Holding: 3, Streams: 10}, 1, GateForced},
		{"converged past the deadline", 260, prepared, Convergence{Holding: 10, Streams: 10}, 1, GateOpen},
		{"late prepare: deadline from its own activation time", 269, late, Convergence{Holding: 1, Streams: 2}, 1, GatePastDeadline},
		{"late prepare: last resort", 284.5, late, Convergence{Holding: 1, Streams: 2}, 1, GateForced},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := policy.GateAt(h(tc.now), active, tc.prepared, tc.c, tc.min); got != tc.want {
				t.Fatalf("GateAt(%vh) = %s, want %s", tc.now, got, tc.want)
			}
		})
	}
}

// Every bound stays inside the active CA's life, whatever the policy.
func TestGateNeverPastExpiry(t *testing.T) {
	active := activeCA()
	for _, p := range []Policy{policy, {PrepareAt: 0.1, ActivateAt: 0.99, PrepareWindow: 1}, {PrepareAt: 0.5, ActivateAt: 0.6, PrepareWindow: 400 * 3600e9}} {
		prepared := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(150), NotAfter: h(450)}
		at := p.ActivateTime(active, prepared)
		d, l := p.Deadline(active, prepared), p.LastResort(active, prepared)
		end := active.NotAfter
		if at.After(end) {
			end = at // a window longer than the CA's life: nothing to hold
		}
		if d.Before(at) || l.Before(d) || l.After(end) {
			t.Fatalf("%+v: activate %s, deadline %s, last resort %s, expiry %s", p, at, d, l, active.NotAfter)
		}
		if at.Before(active.NotAfter) && !l.Before(active.NotAfter) {
			t.Fatalf("%+v: last resort %s not before expiry %s", p, l, active.NotAfter)
		}
	}
}

func TestNextHeld(t *testing.T) {
	cas := []CA{activeCA(), {ID: "p", State: store.CAPrepared, CreatedAt: h(150), NotAfter: h(450)}}
	for _, tc := range []struct {
		now, want float64
	}{
		{201, 250}, // held: next is the deadline, not the past activation time
		{250, 275}, // past the deadline: the last resort
	} {
		next, ok := policy.NextHeld(h(tc.now), cas)
		if !ok || !next.Equal(h(tc.want)) {
			t.Fatalf("NextHeld(%vh) = %s, %v; want %vh", tc.now, next.Sub(t0), ok, tc.want)
		}
		// Unheld, Next still names the activation time.
		if n, _ := policy.Next(h(tc.now), cas); !n.Equal(h(200)) {
			t.Fatalf("Next(%vh) = %s, want 200h", tc.now, n.Sub(t0))
		}
	}
}

func TestHeldReason(t *testing.T) {
	active := activeCA()
	prepared := CA{ID: "p", State: store.CAPrepared, CreatedAt: h(150), NotAfter: h(450)}
	c := Convergence{Holding: 3, Streams: 10}
	got := policy.HeldReason(h(210), active, prepared, c, 1, GateHeld)
	if want := "activation held: 3 of 10 agent streams hold the prepared CA (need 100%); deadline 2026-12-11T10:00:00Z"; got != want {
		t.Fatalf("reason %q, want %q", got, want)
	}
	got = policy.HeldReason(h(260), active, prepared, c, 0.9, GatePastDeadline)
	if !strings.Contains(got, "(need 90%)") || !strings.Contains(got, "could not converge by the deadline 2026-12-11T10:00:00Z") || !strings.Contains(got, "2026-12-12T11:00:00Z") {
		t.Fatalf("reason %q", got)
	}
	if got := policy.HeldReason(h(210), active, prepared, c, 1, GateOpen); got != "" {
		t.Fatalf("open gate has reason %q", got)
	}
}
