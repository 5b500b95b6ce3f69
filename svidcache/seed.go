package svidcache

import (
	"crypto/ecdsa"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"github.com/meshid/meshid/identity"
)

// Held is one SVID the cache holds, with the entry it serves (what a node
// agent persists so a restart can serve it again before reaching the
// server).
type Held struct {
	Entry Entry
	SVID  *identity.SVID
}

// Held lists every still-valid SVID the cache holds, served or idle.
func (c *Cache) Held() []Held {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	out := make([]Held, 0, len(c.slots))
	for _, sl := range c.slots {
		if sl.svid != nil && now.Before(sl.svid.NotAfter) {
			out = append(out, Held{Entry: sl.entry, SVID: sl.svid})
		}
	}
	return out
}

// ErrExpired is returned by Seed for an SVID past its NotAfter.
var ErrExpired = errors.New("svid has expired")

// Seed puts an SVID made earlier (by a previous run of this process, its
// key kept on this node) into e's slot, as if the cache had minted it: the
// next subscriber entitled to e is served it without a sign, even past its
// renewal point, and it is renewed on schedule from then on (at once if
// it is due) and withdrawn at its NotAfter. chain is DER, leaf first. An
// expired SVID is refused (ErrExpired); a slot that already holds an SVID
// is left as it is.
func (c *Cache) Seed(e Entry, chain [][]byte, key *ecdsa.PrivateKey) error {
	svid, err := newSVID(e, chain, key)
	if err != nil {
		return fmt.Errorf("seed svid for %s: %w", e.SpiffeID, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	now := c.clock.Now()
	if !now.Before(svid.NotAfter) {
		return fmt.Errorf("seed svid for %s (serial %s, not after %s): %w", e.SpiffeID, svid.Serial, svid.NotAfter.UTC().Format(time.RFC3339), ErrExpired)
	}
	if sl, ok := c.slots[e.ID]; ok && sl.svid != nil {
		return nil
	}
	sl, ok := c.slots[e.ID]
	if !ok {
		sl = &slot{entry: e, subs: map[*Subscription]struct{}{}}
		c.slots[e.ID] = sl
	}
	sl.svid = svid
	sl.seeded = true
	// Its renewal point over its whole life, not from now as after a mint:
	// a kept SVID found past that point is due now (NotBefore's clock-skew
	// back-dating only brings it a little earlier).
	leaf := svid.Certs[0]
	sl.renewAt = leaf.NotBefore.Add(c.renewDelay(svid.NotAfter.Sub(leaf.NotBefore), mrand.Float64()))
	if sl.refs > 0 {
		c.scheduleLocked(sl, max(sl.renewAt.Sub(now), 0))
		for sub := range sl.subs {
			c.notifySubLocked(sub)
		}
	}
	c.scheduleExpiryLocked(sl, now)
	return nil
}

// RenewDue renews now every held SVID past its renewal point, and retries
// now every held identity whose first mint failed (or whose SVID expired),
// instead of at their next backoff step, and forgets expired identities
// nobody holds any more: a node agent calls it when it reaches its server
// again, so that what fell due during an outage is renewed together (its
// signer batches them into few round trips) and at once. It returns how
// many were scheduled.
func (c *Cache) RenewDue() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	n := 0
	for k, sl := range c.slots {
		if sl.refs == 0 && sl.svid == nil && sl.expired {
			// Its workload lost it during the outage and has not come
			// back since: nothing to renew, and no longer a loss to
			// report (Expired).
			c.dropSlotLocked(k)
			continue
		}
		if sl.refs == 0 || sl.renewing {
			continue
		}
		if (sl.svid != nil && !now.Before(sl.renewAt)) || (sl.svid == nil && sl.retry > 0) {
			c.scheduleLocked(sl, 0)
			n++
		}
	}
	return n
}

// Expired counts the identities whose SVID expired in a workload's hands
// before a renewal could replace it: those workloads are served nothing
// for them now. A workload that lets go meanwhile (a Workload API stream
// ends when the caller has no identity left, and its client retries)
// still counts, until the SVID is renewed or RenewDue finds nobody holds
// it after the signer is back.
func (c *Cache) Expired() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, sl := range c.slots {
		if sl.svid == nil && sl.expired {
			n++
		}
	}
	return n
}

// dropSlotLocked forgets a slot, with its expiry timer (which would
// otherwise keep it in memory until its NotAfter).
func (c *Cache) dropSlotLocked(key string) {
	if sl := c.slots[key]; sl != nil && sl.expStop != nil {
		sl.expStop()
	}
	delete(c.slots, key)
}
