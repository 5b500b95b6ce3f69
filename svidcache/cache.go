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
	// AvailabilityTarget, if positive, is the renewal policy of a node
	// agent that must ride out server outages: an SVID is renewed once
	// less than AvailabilityTarget of its life is left, never later than
	// half its life (and never earlier than a tenth of it, so a target at
	// or beyond the SVID's life cannot make it renew in a loop), with
	// jitter that only brings renewal earlier. Zero keeps the server's
	// policy: half the life, ±10%.
	AvailabilityTarget time.Duration
	// OnChange, if set, is called whenever the SVIDs the cache holds
	// change (one installed, expired or dropped), with the cache's lock
	// held: it must not block or call the cache (a persister arms a
	// timer and reads Held later).
	OnChange func()
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
	target     time.Duration
	onChange   func()

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
	// expStop cancels the expiry timer, which withdraws svid at its
	// NotAfter if it has not been replaced by then.
	expStop func() bool
	// seeded marks an SVID loaded from a previous run (Seed) that no
	// renewal has replaced yet: a first holder is served it even past its
	// renewal point (the signer may be unreachable), and it is renewed at
	// once.
	seeded bool
	// expired is set once svid was withdrawn at its NotAfter, until a
	// renewal succeeds (Expired counts the held ones).
	expired bool
	// renewing is set while renew signs for the slot (RenewDue does not
	// start a second one).
	renewing bool
	retry    time.Duration
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
	oc := cfg.OnChange
	if oc == nil {
		oc = func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Cache{signer: cfg.Signer, matcher: cfg.Matcher, clock: cfg.Clock, log: log, mintFailed: mf,
		target: cfg.AvailabilityTarget, onChange: oc,
		ctx: ctx, cancel: cancel, slots: map[string]*slot{}, subs: map[*Subscription]struct{}{}}
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
		if sl.expStop != nil {
			sl.expStop()
		}
	}
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
}

// RenewSerial re-issues the slot currently serving serial, at once (its
// certificate was revoked), and reports whether there was one.
func (c *Cache) RenewSerial(serial string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, sl := range c.slots {
		if sl.svid != nil && sl.svid.Serial == serial {
			if sl.refs == 0 {
				c.dropSlotLocked(k) // idle: the next caller gets a fresh one
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
			c.dropSlotLocked(k) // idle: signed by the old CA; drop it
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
			c.dropSlotLocked(k)
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
			c.dropSlotLocked(k)
		}
	}
}
