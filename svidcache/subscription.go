package svidcache

import (
	"context"
	"slices"
	"sync"

	"github.com/meshid/meshid/identity"
)

// Subscription is one caller's live view of its identities. Changed is
// signalled (coalesced: one pending signal at most) whenever Snapshot has
// something new. It implements identity.Subscription.
type Subscription struct {
	c       *Cache
	caller  identity.Caller
	extra   []Entry
	bundles bool     // bundles only: holds no slot, never re-matched
	entries []string // slot keys, in snapshot order
	snap    *identity.Snapshot
	ch      chan struct{}
	once    sync.Once
	// err, once set, ends the subscription for its holder (endLocked).
	err error
}

// Snapshot returns the caller's current identities and bundles.
func (s *Subscription) Snapshot() *identity.Snapshot {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.snap
}

// Changed is signalled whenever Snapshot changes.
func (s *Subscription) Changed() <-chan struct{} { return s.ch }

// Err is non-nil once the subscription has been ended by EndCallers: the
// credential the caller authenticated with, or the identity it held, was
// revoked. Changed is signalled when that happens.
func (s *Subscription) Err() error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.err
}

// Close ends the subscription; SVIDs nobody holds stop being renewed.
func (s *Subscription) Close() {
	s.once.Do(func() {
		c := s.c
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.subs, s)
		for _, k := range s.entries {
			c.release(k, s)
		}
	})
}

// Subscribe returns the caller's live identities: an SVID for every entry
// the Matcher gives it, and the bundles. A caller entitled to nothing
// still gets the bundles. One identity that cannot be minted does not fail
// the subscription: it is retried on its own with backoff.
func (c *Cache) Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error) {
	sub, err := c.SubscribeWith(ctx, caller)
	if err != nil {
		return nil, err
	}
	return sub, nil
}

// SubscribeWith is Subscribe with extra entries ahead of the caller's own
// (the server's serving certificate). Unlike the caller's own, an extra
// entry that cannot be minted fails the subscription.
func (c *Cache) SubscribeWith(ctx context.Context, caller identity.Caller, extra ...Entry) (*Subscription, error) {
	sub := &Subscription{c: c, caller: caller, extra: extra, ch: make(chan struct{}, 1)}
	c.entMu.Lock()
	wanted := c.entitlements(sub)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.entMu.Unlock()
		return nil, ErrClosed
	}
	var missing []*slot
	for _, e := range wanted {
		sl := c.acquire(e, sub)
		sub.entries = append(sub.entries, e.ID)
		if sl.svid == nil {
			missing = append(missing, sl)
		}
	}
	c.subs[sub] = struct{}{}
	c.mu.Unlock()
	c.entMu.Unlock()

	// Mint outside the lock: signing must not stall other callers. One
	// identity that cannot be minted (an entry stored by an older version
	// with a SAN the CA refuses, a busy signer) must not take away the
	// caller's others or its bundle: it is retried on its own.
	for _, sl := range missing {
		if err := c.ensure(ctx, sl); err != nil {
			if ctx.Err() != nil || slices.ContainsFunc(extra, func(e Entry) bool { return e.ID == sl.entry.ID }) {
				sub.Close()
				return nil, err
			}
			c.mintFailedOnce(sl, err)
		}
	}
	return c.admit(sub)
}

// SubscribeBundles subscribes caller to the trust bundles only: it holds
// no SVID and nothing is minted for it. The verifier RPCs (FetchX509Bundles,
// FetchJWTBundles, ValidateJWTSVID) use it.
func (c *Cache) SubscribeBundles(_ context.Context, caller identity.Caller) (identity.Subscription, error) {
	sub := &Subscription{c: c, caller: caller, bundles: true, ch: make(chan struct{}, 1)}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.subs[sub] = struct{}{}
	c.mu.Unlock()
	return c.admit(sub)
}

// admit finishes a registered subscription: the Matcher's last word, then
// its first snapshot.
func (c *Cache) admit(sub *Subscription) (*Subscription, error) {
	if err := c.matcher.Admit(sub.caller); err != nil {
		sub.Close()
		return nil, err
	}
	c.mu.Lock()
	sub.snap = c.snapshotLocked(sub)
	err := sub.err
	c.mu.Unlock()
	if err != nil {
		return nil, err // ended while it was being set up
	}
	return sub, nil
}

// entitlements lists the entries a subscription holds: its extra entries,
// then the Matcher's.
func (c *Cache) entitlements(sub *Subscription) []Entry {
	if sub.bundles {
		return nil
	}
	return append(slices.Clone(sub.extra), c.matcher.Match(sub.caller)...)
}

func (c *Cache) acquire(e Entry, sub *Subscription) *slot {
	sl, ok := c.slots[e.ID]
	if !ok {
		sl = &slot{entry: e, subs: map[*Subscription]struct{}{}}
		c.slots[e.ID] = sl
	}
	if sl.refs == 0 && sl.svid != nil {
		// An idle slot: its SVID is reused until its renewal point, so a
		// caller that polls (REST SDS, FetchSecrets) does not get a new
		// key and certificate, and a new inventory row, on every call.
		switch now := c.clock.Now(); {
		case now.Before(sl.renewAt):
			c.scheduleLocked(sl, sl.renewAt.Sub(now))
		case sl.seeded && now.Before(sl.svid.NotAfter):
			// Kept from before a restart, perhaps through a server
			// outage: serve it while it is valid and renew it now;
			// the expiry timer withdraws it if that keeps failing.
			c.scheduleLocked(sl, 0)
		default:
			sl.svid = nil
		}
	}
	sl.refs++
	sl.subs[sub] = struct{}{}
	return sl
}

func (c *Cache) release(key string, sub *Subscription) {
	sl, ok := c.slots[key]
	if !ok {
		return
	}
	// A slot replaced since (Drop, then a new holder) is not ours.
	if _, held := sl.subs[sub]; !held {
		return
	}
	delete(sl.subs, sub)
	sl.refs--
	if sl.refs > 0 {
		return
	}
	// Nobody holds it: stop renewing, but keep the SVID until its renewal
	// point for the next caller (SweepIdle drops it after that).
	if sl.stop != nil {
		sl.stop()
		sl.stop = nil
	}
}

// notifyLocked rebuilds the snapshot of every subscriber match selects and
// signals it.
func (c *Cache) notifyLocked(match func(*Subscription) bool) {
	for s := range c.subs {
		if match(s) {
			c.notifySubLocked(s)
		}
	}
}

// notifySubLocked rebuilds one subscriber's snapshot and signals it.
func (c *Cache) notifySubLocked(s *Subscription) {
	if s.snap == nil {
		return // still being built by Subscribe, which takes the latest state
	}
	if _, live := c.subs[s]; !live {
		return
	}
	s.snap = c.snapshotLocked(s)
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

func (c *Cache) snapshotLocked(s *Subscription) *identity.Snapshot {
	snap := &identity.Snapshot{}
	// An SVID past its NotAfter is never served, even in the moment
	// before its expiry timer has run.
	now := c.clock.Now()
	for _, k := range s.entries {
		if sl := c.slots[k]; sl != nil && sl.svid != nil && now.Before(sl.svid.NotAfter) {
			snap.SVIDs = append(snap.SVIDs, sl.svid)
		}
	}
	if c.bundle != nil {
		snap.Bundles = []*identity.Bundle{c.bundle}
	}
	if c.jwtBundle != nil {
		snap.JWTBundles = []*identity.JWTBundle{c.jwtBundle}
	}
	return snap
}

// SetBundles publishes new trust bundles to every subscriber, if their
// versions changed. A nil jb leaves the JWT bundle as it is.
func (c *Cache) SetBundles(b *identity.Bundle, jb *identity.JWTBundle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	changed := false
	if b != nil && (c.bundle == nil || c.bundle.Version != b.Version) {
		c.bundle, changed = b, true
	}
	if jb != nil && (c.jwtBundle == nil || c.jwtBundle.Version != jb.Version) {
		c.jwtBundle, changed = jb, true
	}
	if changed {
		c.notifyLocked(func(*Subscription) bool { return true })
	}
}
