// Package svidcache keeps the live X.509-SVIDs of connected workloads: for
// every entry some subscriber is entitled to, one slot holding a current
// SVID whose key the cache made, renewed at half its life (with jitter),
// retried with backoff when the signer fails, kept for reuse while idle
// until its renewal point, and pushed (coalesced) to every subscriber that
// holds it.
//
// It implements sds.Source and workload.Source's Subscribe and depends only
// on what it declares: a Signer (a CSR in, a certificate chain out: a node
// agent asks a remote server; the server's own signer is a KeySigner, given
// the public key directly), a Matcher
// (which entries a caller may hold) and a Clock. Private keys never leave
// the process that serves them.
package svidcache

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/meshid/meshid/identity"
)

// Renewal policy: an SVID is replaced at half its life, ±10% jitter so that
// thousands of proxies minted together do not all renew in the same second.
const (
	renewFraction = 0.5
	renewJitter   = 0.1
	// Failed mints retry with exponential backoff from minRetry to
	// maxRetry; the SVID in hand stays valid meanwhile.
	minRetry = time.Second
	maxRetry = time.Minute
)

// Entry is what the cache needs to know of one identity it serves.
type Entry struct {
	// ID keys the slot: a registration entry's ID, or DirectKey for an
	// identity the caller holds directly.
	ID       string
	SpiffeID string
	DNSNames []string
	// TTL is the requested lifetime; 0 leaves it to the signer.
	TTL time.Duration
	// Hint is the Workload API hint of its SVIDs.
	Hint string
}

// Signer signs an X.509-SVID for entry e over the public key of csrDER
// (PKCS#10, signed with the key the cache made). It returns the DER chain,
// leaf first, then intermediates. It must be safe for concurrent use.
type Signer interface {
	SignX509SVID(ctx context.Context, e Entry, csrDER []byte) ([][]byte, error)
}

// KeySigner is a Signer that can also certify a public key handed over in
// process, without a CSR. The cache checks for it and skips making and
// parsing a CSR when its Signer has it: a CSR proves possession of the key
// to a signer across a trust boundary (a node agent's remote server), which
// a signer in the same process does not need, and making one costs an
// ECDSA signature plus Go's check of it, about as much CPU as signing the
// certificate itself. pub is always the public half of the key the cache
// made; the returned chain is as for SignX509SVID.
type KeySigner interface {
	Signer
	SignX509SVIDKey(ctx context.Context, e Entry, pub crypto.PublicKey) ([][]byte, error)
}

// Matcher says what a caller may hold.
type Matcher interface {
	// Match lists the entries caller is entitled to, its default first.
	Match(caller identity.Caller) []Entry
	// Admit is checked once a subscription is registered: a non-nil error
	// (a credential revoked while it subscribed) refuses it. Checking after
	// registration means a concurrent revocation either ends the
	// subscription (EndCallers) or is seen here.
	Admit(caller identity.Caller) error
}

// Clock is the time every renewal decision uses.
type Clock interface {
	Now() time.Time
	// AfterFunc runs f on its own goroutine after d; stop cancels it and
	// reports whether it did.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

// Config is what New needs. Signer, Matcher and Clock are required.
type Config struct {
	Signer  Signer
	Matcher Matcher
	Clock   Clock
	Logger  *slog.Logger
	// MintFailed, if set, is told of every failed mint: renewal is true
	// when an SVID in service could not be replaced, false for a first
	// issue.
	MintFailed func(err error, renewal bool)
}

// ErrClosed is returned by Subscribe once the cache is shutting down.
var ErrClosed = errors.New("server is shutting down")

// Cache is the live-SVID cache. Its methods are safe for concurrent use.
type Cache struct {
	signer     Signer
	matcher    Matcher
	clock      Clock
	log        *slog.Logger
	mintFailed func(err error, renewal bool)

	// ctx is what renewals run under; Close cancels it and waits for them
	// (wg).
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// entMu makes "work out a caller's entitlements, then take its slots"
	// one step, for Subscribe and EntriesChanged alike: otherwise a
	// subscriber computing from an entry being deleted could register
	// after the deletion's re-match and keep (and renew) it.
	entMu sync.Mutex

	mu        sync.Mutex
	slots     map[string]*slot
	subs      map[*Subscription]struct{}
	bundle    *identity.Bundle
	jwtBundle *identity.JWTBundle
	closed    bool
}

// slot is one entry's live SVID.
type slot struct {
	entry   Entry
	svid    *identity.SVID
	renewAt time.Time
	refs    int
	stop    func() bool // cancels the renewal timer
	retry   time.Duration
	// subs are the subscriptions holding this slot, told when it changes.
	subs map[*Subscription]struct{}
}

// New makes an empty cache. It serves no bundle until SetBundles.
func New(cfg Config) *Cache {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mf := cfg.MintFailed
	if mf == nil {
		mf = func(error, bool) {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Cache{signer: cfg.Signer, matcher: cfg.Matcher, clock: cfg.Clock, log: log, mintFailed: mf,
		ctx: ctx, cancel: cancel, slots: map[string]*slot{}, subs: map[*Subscription]struct{}{}}
}

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
		if now := c.clock.Now(); now.Before(sl.renewAt) {
			c.scheduleLocked(sl, sl.renewAt.Sub(now))
		} else {
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
	for _, k := range s.entries {
		if sl := c.slots[k]; sl != nil && sl.svid != nil {
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
		delete(c.slots, e.ID)
		return
	}
	sl.entry = e
	c.scheduleLocked(sl, 0)
}

// Close stops every renewal, cancels those in flight and waits for them;
// subscriptions see no further changes.
func (c *Cache) Close() {
	c.mu.Lock()
	c.closed = true
	for _, sl := range c.slots {
		if sl.stop != nil {
			sl.stop()
		}
	}
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
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
			delete(c.slots, k)
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
		delete(c.slots, key)
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return
	}
	c.notifyLocked(func(s *Subscription) bool {
		return slices.ContainsFunc(s.entries, func(k string) bool { return slices.Contains(keys, k) })
	})
}

// RenewSerial re-issues the slot currently serving serial, at once (its
// certificate was revoked), and reports whether there was one.
func (c *Cache) RenewSerial(serial string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, sl := range c.slots {
		if sl.svid != nil && sl.svid.Serial == serial {
			if sl.refs == 0 {
				delete(c.slots, k) // idle: the next caller gets a fresh one
			} else {
				c.scheduleLocked(sl, 0)
			}
			return true
		}
	}
	return false
}

// RenewAll re-issues every served SVID now (after a CA activation). Each
// slot renews on its own timer, so the signer's limits spread the burst;
// idle slots are dropped.
func (c *Cache) RenewAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, sl := range c.slots {
		switch {
		case sl.refs == 0:
			delete(c.slots, k) // idle: signed by the old CA; drop it
		case sl.svid != nil:
			c.scheduleLocked(sl, 0)
		}
	}
}

// SlotView is what a Reissue filter sees of a slot.
type SlotView struct {
	Leaf    *x509.Certificate
	RenewAt time.Time
}

// Reissue re-issues the SVIDs match selects, the i-th served one after
// i x step so that a fleet-wide re-issue queues inside the signer's limits
// rather than failing against them (an emergency CA rotation). Idle slots
// selected are dropped: their next caller gets a fresh SVID. It returns how
// many served SVIDs were scheduled.
func (c *Cache) Reissue(match func(SlotView) bool, step time.Duration) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	n := 0
	for k, sl := range c.slots {
		if sl.svid == nil || len(sl.svid.Certs) == 0 || !match(SlotView{Leaf: sl.svid.Certs[0], RenewAt: sl.renewAt}) {
			continue
		}
		if sl.refs == 0 {
			delete(c.slots, k)
			continue
		}
		d := time.Duration(n) * step
		sl.renewAt = now.Add(d)
		c.scheduleLocked(sl, d)
		n++
	}
	return n
}

// Served counts the served (held) SVIDs whose leaf match selects.
func (c *Cache) Served(match func(leaf *x509.Certificate) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, sl := range c.slots {
		if sl.refs > 0 && sl.svid != nil && len(sl.svid.Certs) > 0 && match(sl.svid.Certs[0]) {
			n++
		}
	}
	return n
}

// overdueGrace is how late a renewal may be before it counts as overdue: a
// retry in progress is not yet a problem.
const overdueGrace = time.Minute

// Stats reports the soonest expiry among served SVIDs, how many are past
// their renewal point (plus a minute's grace), and how many are served.
func (c *Cache) Stats(now time.Time) (earliest time.Time, overdue, served int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, sl := range c.slots {
		if sl.svid == nil || sl.refs == 0 {
			continue
		}
		served++
		if earliest.IsZero() || sl.svid.NotAfter.Before(earliest) {
			earliest = sl.svid.NotAfter
		}
		if now.After(sl.renewAt.Add(overdueGrace)) {
			overdue++
		}
	}
	return earliest, overdue, served
}

// SweepIdle drops idle slots whose SVID has reached its renewal point.
func (c *Cache) SweepIdle(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, sl := range c.slots {
		if sl.refs == 0 && !now.Before(sl.renewAt) {
			delete(c.slots, k)
		}
	}
}
