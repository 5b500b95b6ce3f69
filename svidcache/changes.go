package svidcache

import (
	"context"
	"slices"

	"github.com/meshid/meshid/identity"
)

// EntriesChanged re-matches every subscriber after entries were created,
// changed or deleted: a new entry is served at once, a deleted one is
// withdrawn and no longer renewed.
func (c *Cache) EntriesChanged(ctx context.Context) {
	c.entMu.Lock()
	defer c.entMu.Unlock()
	c.mu.Lock()
	subs := make([]*Subscription, 0, len(c.subs))
	for s := range c.subs {
		if !s.bundles {
			subs = append(subs, s)
		}
	}
	c.mu.Unlock()
	for _, s := range subs {
		wanted := c.entitlements(s)
		keys := make([]string, len(wanted))
		for i, e := range wanted {
			keys[i] = e.ID
		}
		c.mu.Lock()
		if _, live := c.subs[s]; !live || slices.Equal(keys, s.entries) {
			c.mu.Unlock()
			continue
		}
		var missing []*slot
		for _, e := range wanted {
			if !slices.Contains(s.entries, e.ID) {
				if sl := c.acquire(e, s); sl.svid == nil {
					missing = append(missing, sl)
				}
			}
		}
		for _, k := range s.entries {
			if !slices.Contains(keys, k) {
				c.release(k, s)
			}
		}
		s.entries = keys
		c.mu.Unlock()
		for _, sl := range missing {
			if err := c.ensure(ctx, sl); err != nil {
				c.mintFailedOnce(sl, err)
			}
		}
		c.mu.Lock()
		if _, live := c.subs[s]; live {
			c.notifySubLocked(s)
		}
		c.mu.Unlock()
	}
}

// EntryUpdated puts the new version of an entry into its slot: a held slot
// is re-issued now (new DNS names, TTL or hint), an idle one is dropped so
// its next holder gets a fresh SVID.
func (c *Cache) EntryUpdated(e Entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sl, ok := c.slots[e.ID]
	if !ok {
		return
	}
	if sl.refs == 0 {
		if sl.stop != nil {
			sl.stop()
		}
		c.dropSlotLocked(e.ID)
		return
	}
	sl.entry = e
	c.scheduleLocked(sl, 0)
}

// EndCallers ends every subscription whose caller match selects, with the
// error why gives it, and reports how many: it gives up its slots (nothing
// more is renewed for it), serves nothing from now on, and is told through
// Changed. Slots only such a caller could hold (DirectKey with a serial)
// are dropped rather than kept for reuse.
func (c *Cache) EndCallers(match func(identity.Caller) bool, why func(identity.Caller) error) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for s := range c.subs {
		if s.err == nil && match(s.caller) {
			c.endLocked(s, why(s.caller))
			n++
		}
	}
	return n
}

func (c *Cache) endLocked(s *Subscription, err error) {
	s.err = err
	delete(c.subs, s)
	for _, k := range s.entries {
		c.release(k, s)
		// A slot minted for this caller's own certificate serves nobody
		// else; drop it rather than keep a revoked lineage for reuse.
		if sl := c.slots[k]; sl != nil && sl.refs == 0 && DirectSerial(k) != "" {
			c.dropSlotLocked(k)
		}
	}
	s.entries = nil
	s.snap = &identity.Snapshot{}
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// Drop withdraws the slots whose key match selects from every subscriber
// holding them (a revoked identity): they are not renewed.
func (c *Cache) Drop(match func(key string) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var keys []string
	for key, sl := range c.slots {
		if !match(key) {
			continue
		}
		if sl.stop != nil {
			sl.stop()
		}
		if sl.expStop != nil {
			sl.expStop()
		}
		delete(c.slots, key)
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return
	}
	c.onChange()
	c.notifyLocked(func(s *Subscription) bool {
		return slices.ContainsFunc(s.entries, func(k string) bool { return slices.Contains(keys, k) })
	})
}
