// Package lifecycle is the CA lifecycle policy: when the next CA is
// prepared (published in the trust bundle before it signs), when it is
// activated (signs), and when a CA that no longer signs leaves the bundle.
// Every decision is a pure function of the CAs and the time, so it is
// tested as tables; the server runs it on a timer of its injected clock,
// on the leader only, and keeps the CAs themselves in the store.
package lifecycle

import (
	"time"

	"github.com/meshid/meshid/store"
)

// Policy holds the thresholds of a CA's life.
type Policy struct {
	// PrepareAt and ActivateAt are the fractions of the active CA's life
	// at which its successor is prepared and activated: 0 < PrepareAt <
	// ActivateAt < 1.
	PrepareAt, ActivateAt float64
	// PrepareWindow is the least time a prepared CA is published before it
	// signs, so that every peer renewed meanwhile trusts it.
	PrepareWindow time.Duration
}

// CA is what the policy knows of one CA.
type CA struct {
	ID        string
	State     store.CAState
	CreatedAt time.Time
	NotAfter  time.Time
	// LastNotAfter is the latest NotAfter of an SVID the CA signed.
	LastNotAfter time.Time
	// Dependents counts, for a tainted CA, the served SVIDs it still
	// signs for.
	Dependents int64
}

// Step is a lifecycle transition.
type Step int

// Steps.
const (
	None     Step = iota
	Prepare       // make the next CA and publish it
	Activate      // make the prepared CA sign; retire the active one
)

func (s Step) String() string {
	switch s {
	case Prepare:
		return "prepare"
	case Activate:
		return "activate"
	}
	return "none"
}

// lifeAt is the moment f of c's life (from creation to expiry) has passed.
func lifeAt(c CA, f float64) time.Time {
	return c.CreatedAt.Add(time.Duration(float64(c.NotAfter.Sub(c.CreatedAt)) * f))
}

// PrepareTime is when the active CA's successor is prepared.
func (p Policy) PrepareTime(active CA) time.Time { return lifeAt(active, p.PrepareAt) }

// SafeAt is when a prepared CA has been published for the whole window.
func (p Policy) SafeAt(prepared CA) time.Time { return prepared.CreatedAt.Add(p.PrepareWindow) }

// ActivateTime is when the prepared CA replaces the active one: at
// ActivateAt of the active CA's life, but never before the prepared CA has
// been published for PrepareWindow.
func (p Policy) ActivateTime(active, prepared CA) time.Time {
	at := lifeAt(active, p.ActivateAt)
	if safe := p.SafeAt(prepared); safe.After(at) {
		return safe
	}
	return at
}

// Due is the step to take at now, given the active CA and the prepared
// one (nil if none).
func (p Policy) Due(now time.Time, active, prepared *CA) Step {
	switch {
	case active == nil:
		return None
	case prepared == nil && !now.Before(p.PrepareTime(*active)):
		return Prepare
	case prepared != nil && !now.Before(p.ActivateTime(*active, *prepared)):
		return Activate
	}
	return None
}

// InBundle says whether peers must still trust c at now: prepared and
// active CAs until they expire, a retired one until the last SVID it
// signed has expired, a tainted one only while a served SVID also still
// depends on it, a revoked one never.
func InBundle(now time.Time, c CA) bool {
	if now.After(c.NotAfter) {
		return false
	}
	switch c.State {
	case store.CARevoked:
		return false
	case store.CATainted:
		return c.Dependents > 0 && now.Before(c.LastNotAfter)
	case store.CARetired:
		return now.Before(c.LastNotAfter)
	}
	return true
}

// Next is the first moment after now at which something is due among cas:
// a step, or a CA that no longer signs leaving the bundle (the bundle must
// be pushed then). also lists other moments the caller wants in the same
// timer (a revoked serial expiring off its CRL, a JWT key leaving the
// JWKS). ok is false if nothing is ever due.
func (p Policy) Next(now time.Time, cas []CA, also ...time.Time) (next time.Time, ok bool) {
	return p.next(now, cas, false, also...)
}

func (p Policy) next(now time.Time, cas []CA, held bool, also ...time.Time) (next time.Time, ok bool) {
	consider := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	var active, prepared *CA
	for i := range cas {
		c := &cas[i]
		switch c.State {
		case store.CAActive:
			if active == nil || !c.CreatedAt.Before(active.CreatedAt) {
				active = c
			}
		case store.CAPrepared:
			prepared = c
		case store.CARetired:
			if InBundle(now, *c) {
				// Just past its last SVID's expiry, so that it is gone
				// when the timer fires.
				consider(c.LastNotAfter.Add(time.Millisecond))
			}
		}
	}
	for _, t := range also {
		consider(t)
	}
	if active != nil {
		if prepared == nil {
			consider(p.PrepareTime(*active))
		} else if held {
			consider(p.NextGateTime(now, *active, *prepared))
		} else {
			consider(p.ActivateTime(*active, *prepared))
		}
	}
	return next, !next.IsZero()
}
