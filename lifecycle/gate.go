package lifecycle

import (
	"fmt"
	"math"
	"time"
)

// The convergence gate of automatic activation. A prepared CA is
// published at once, but a node agent's proxies hold it only once they
// have ACKed a bundle that contains it; activating before that makes every
// SVID it signs untrusted by the proxies that lag. So, once activation is
// due by time (ActivateTime), it waits until the fraction of agent streams
// holding the prepared CA reaches the minimum.
//
// Waiting cannot last for ever: the active CA expires, and an expired
// active CA breaks every workload where an early activation breaks only
// the lagging ones. Two moments bound the wait, both within the margin m
// between ActivateTime and the active CA's expiry:
//   - Deadline (ActivateTime + m/2): past it the gate reports that the CA
//     could not converge (the alert goes critical), and an operator has
//     the other half of the margin to fix or evict the lagging agents or
//     activate by hand. It still does not activate.
//   - LastResort (Deadline + m/4, i.e. a quarter of the margin before
//     expiry): activation proceeds without convergence, since the active
//     CA must not expire. With the defaults (activate at 2/3 of life) the
//     deadline is at 5/6 and the last resort at 11/12 of the active CA's
//     life, which leaves SVIDs signed before it well inside the CA's life.

// Convergence is how many of the connected agents' bundle-carrying streams
// hold a bundle that contains the prepared CA.
type Convergence struct {
	Holding, Streams int
}

// Ratio is Holding/Streams; 1 with no streams (nobody to wait for).
func (c Convergence) Ratio() float64 {
	if c.Streams <= 0 {
		return 1
	}
	return float64(c.Holding) / float64(c.Streams)
}

// Gate is the convergence gate's decision for a due activation.
type Gate int

// Gate decisions.
const (
	GateOpen         Gate = iota // activate: converged, or gating is off
	GateHeld                     // wait for convergence
	GatePastDeadline             // could not converge by the deadline; still waiting
	GateForced                   // last resort: activate without convergence
)

func (g Gate) String() string {
	switch g {
	case GateHeld:
		return "held"
	case GatePastDeadline:
		return "held past deadline"
	case GateForced:
		return "forced"
	}
	return "open"
}

// Held reports whether the gate keeps the activation back.
func (g Gate) Held() bool { return g == GateHeld || g == GatePastDeadline }

// margin is the active CA's life left after the activation was due.
func (p Policy) margin(active, prepared CA) (time.Time, time.Duration) {
	at := p.ActivateTime(active, prepared)
	return at, max(active.NotAfter.Sub(at), 0)
}

// Deadline is when a held activation is reported as not converging.
func (p Policy) Deadline(active, prepared CA) time.Time {
	at, m := p.margin(active, prepared)
	return at.Add(m / 2)
}

// LastResort is when a held activation proceeds without convergence.
func (p Policy) LastResort(active, prepared CA) time.Time {
	at, m := p.margin(active, prepared)
	return at.Add(m / 2).Add(m / 4)
}

// GateAt decides a due activation at now: min is the least Ratio of c
// that opens the gate (min <= 0: no gating).
func (p Policy) GateAt(now time.Time, active, prepared CA, c Convergence, min float64) Gate {
	switch {
	case min <= 0 || c.Ratio() >= min:
		return GateOpen
	case !now.Before(p.LastResort(active, prepared)):
		return GateForced
	case !now.Before(p.Deadline(active, prepared)):
		return GatePastDeadline
	}
	return GateHeld
}

// NextGateTime is the next moment a held activation's gate changes by
// itself (the deadline, then the last resort); convergence changing is
// the caller's to watch.
func (p Policy) NextGateTime(now time.Time, active, prepared CA) time.Time {
	if d := p.Deadline(active, prepared); now.Before(d) {
		return d
	}
	return p.LastResort(active, prepared)
}

// NextHeld is Next while the activation is held by the gate: the
// activation's moment is the gate's next one instead of the (past)
// activation time.
func (p Policy) NextHeld(now time.Time, cas []CA, also ...time.Time) (time.Time, bool) {
	return p.next(now, cas, true, also...)
}

// HeldReason says why an activation is held, for `meshid ca show`.
func (p Policy) HeldReason(now time.Time, active, prepared CA, c Convergence, min float64, g Gate) string {
	base := fmt.Sprintf("activation held: %d of %d agent streams hold the prepared CA (need %s)", c.Holding, c.Streams, percent(min))
	last := p.LastResort(active, prepared).UTC().Format(time.RFC3339)
	switch g {
	case GateHeld:
		return fmt.Sprintf("%s; deadline %s", base, p.Deadline(active, prepared).UTC().Format(time.RFC3339))
	case GatePastDeadline:
		return fmt.Sprintf("%s; could not converge by the deadline %s: fix or evict the lagging agents, or run 'meshid ca activate'; activated anyway at %s (the active CA expires %s)",
			base, p.Deadline(active, prepared).UTC().Format(time.RFC3339), last, active.NotAfter.UTC().Format(time.RFC3339))
	}
	return ""
}

func percent(f float64) string {
	return fmt.Sprintf("%g%%", math.Round(f*1000)/10)
}
