package svidcache

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
)

// ensure mints the slot's first SVID if nobody has yet.
func (c *Cache) ensure(ctx context.Context, sl *slot) error {
	c.mu.Lock()
	// A slot whose mint failed has its retry scheduled: a new holder waits
	// for it rather than adding a mint attempt of its own.
	have := sl.svid != nil || sl.retry > 0 && sl.stop != nil
	c.mu.Unlock()
	if have {
		return nil
	}
	svid, err := c.mint(ctx, sl.entry)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if sl.svid == nil && c.slots[sl.entry.ID] == sl {
		c.installLocked(sl, svid)
	}
	return nil
}

// mint makes a key here, where it is used, and has the Signer certify it:
// only the public key leaves the cache, as a CSR unless the Signer is a
// KeySigner in this process.
func (c *Cache) mint(ctx context.Context, e Entry) (*identity.SVID, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: generate key: %w", e.SpiffeID, err)
	}
	chain, err := c.sign(ctx, e, key)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: %w", e.SpiffeID, err)
	}
	svid, err := newSVID(e, chain, key)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: %w", e.SpiffeID, err)
	}
	return svid, nil
}

// sign has the Signer certify key's public half for e.
func (c *Cache) sign(ctx context.Context, e Entry, key *ecdsa.PrivateKey) ([][]byte, error) {
	if ks, ok := c.signer.(KeySigner); ok {
		return ks.SignX509SVIDKey(ctx, e, key.Public())
	}
	// The subject is left empty: the signer takes the identity and SANs
	// from the entry, never from the request.
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("make CSR: %w", err)
	}
	return c.signer.SignX509SVID(ctx, e, csr)
}

// errWrongKey is a signer's answer that certifies another key than the
// CSR's.
var errWrongKey = errors.New("signed certificate is not for the requested key")

func newSVID(e Entry, chain [][]byte, key *ecdsa.PrivateKey) (*identity.SVID, error) {
	if len(chain) == 0 {
		return nil, errors.New("signer returned no certificate")
	}
	certs := make([]*x509.Certificate, 0, len(chain))
	for _, der := range chain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parse signed certificate: %w", err)
		}
		certs = append(certs, cert)
	}
	leaf := certs[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return nil, errWrongKey
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("signed certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal svid key: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return nil, err
	}
	return &identity.SVID{
		ID:       id,
		EntryID:  e.ID,
		Hint:     e.Hint,
		Certs:    certs,
		ChainPEM: ca.EncodeCertsPEM(chain...),
		Key:      key,
		KeyPEM:   keyPEM,
		KeyDER:   keyDER,
		Serial:   leaf.SerialNumber.Text(16),
		NotAfter: leaf.NotAfter,
	}, nil
}

// installLocked puts a new SVID in its slot, schedules its renewal and
// pushes it to every subscriber holding the slot.
func (c *Cache) installLocked(sl *slot, svid *identity.SVID) {
	sl.svid = svid
	sl.retry = 0
	sl.seeded = false
	sl.expired = false
	// The life from now, not from NotBefore: NotBefore is back-dated for
	// clock skew, which would make short-lived SVIDs renew at once,
	// forever.
	now := c.clock.Now()
	delay := c.renewDelay(svid.NotAfter.Sub(now), mrand.Float64())
	sl.renewAt = now.Add(delay)
	c.scheduleLocked(sl, delay)
	c.scheduleExpiryLocked(sl, now)
	// Only the slot's own holders: a mass re-issue of N slots must not
	// walk all N subscriptions N times.
	for sub := range sl.subs {
		c.notifySubLocked(sub)
	}
	c.onChange()
}

// renewDelay is the cache's renewal policy (Config.AvailabilityTarget).
func (c *Cache) renewDelay(life time.Duration, u float64) time.Duration {
	if c.target > 0 {
		return targetDelay(life, c.target, u)
	}
	return renewDelay(life, u)
}

// renewDelay is when an SVID with life left is renewed, for u uniform in
// [0, 1): half its life, ±renewJitter.
func renewDelay(life time.Duration, u float64) time.Duration {
	jitter := 1 + renewJitter*(2*u-1)
	return time.Duration(float64(life) * renewFraction * jitter)
}

// minTargetFraction is the earliest point of its life an SVID is renewed
// at under an availability target: a target longer than the SVID lives
// cannot be met, and renewing at once would loop.
const minTargetFraction = 0.1

// targetDelay is when an SVID with life left is renewed under an
// availability target, for u uniform in [0, 1): when target is left,
// but no later than half the life and no sooner than a tenth of it; the
// jitter (up to renewJitter) only brings it earlier, so that at renewal
// the SVID always has at least target (or half its life) left.
func targetDelay(life, target time.Duration, u float64) time.Duration {
	d := min(life-target, time.Duration(float64(life)*renewFraction))
	d = max(d, time.Duration(float64(life)*minTargetFraction))
	return time.Duration(float64(d) * (1 - renewJitter*u))
}

// scheduleExpiryLocked arms the withdrawal of the slot's SVID at its
// NotAfter: if every renewal until then failed (the server is
// unreachable), subscribers are told it is gone rather than kept on a
// certificate their peers refuse.
func (c *Cache) scheduleExpiryLocked(sl *slot, now time.Time) {
	if sl.expStop != nil {
		sl.expStop()
	}
	if c.closed {
		return
	}
	svid := sl.svid
	sl.expStop = c.clock.AfterFunc(max(svid.NotAfter.Sub(now), 0), func() { c.expire(sl, svid) })
}

// expire withdraws svid from its slot if it still serves it. A held
// slot's renewal is past due by then, so its retry timer (or a renewal in
// flight, which re-arms it on failure) goes on: the next success serves
// again.
func (c *Cache) expire(sl *slot, svid *identity.SVID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.slots[sl.entry.ID] != sl || sl.svid != svid {
		return
	}
	sl.svid = nil
	sl.seeded = false
	sl.expired = true
	if sl.refs == 0 {
		delete(c.slots, sl.entry.ID)
	} else {
		c.log.Error("svid expired before it could be renewed; withdrawn from its workloads", "spiffe_id", sl.entry.SpiffeID,
			"serial", svid.Serial, "not_after", svid.NotAfter)
		for sub := range sl.subs {
			c.notifySubLocked(sub)
		}
	}
	c.onChange()
}

func (c *Cache) scheduleLocked(sl *slot, delay time.Duration) {
	if sl.stop != nil {
		sl.stop()
	}
	if c.closed {
		return
	}
	sl.stop = c.clock.AfterFunc(max(delay, 0), func() { c.renew(sl) })
}

// renew replaces a slot's SVID. On failure it retries with backoff; the
// old SVID stays in service, and the failure is reported so that alerts
// fire long before it expires.
func (c *Cache) renew(sl *slot) {
	c.mu.Lock()
	if c.closed || c.slots[sl.entry.ID] != sl || sl.refs == 0 {
		c.mu.Unlock()
		return
	}
	e := sl.entry
	c.wg.Add(1)
	defer c.wg.Done()
	sl.renewing = true
	c.mu.Unlock()

	svid, err := c.mint(c.ctx, e)

	c.mu.Lock()
	defer c.mu.Unlock()
	sl.renewing = false
	if c.closed || c.slots[sl.entry.ID] != sl {
		return
	}
	if err != nil && sl.svid == nil {
		c.mintFailedLocked(sl, err)
		return
	}
	if err != nil {
		sl.retry = nextRetry(sl.retry)
		c.mintFailed(err, true)
		c.log.Error("svid renewal failed; retrying", "spiffe_id", e.SpiffeID, "retry_in", sl.retry, "expires", sl.svid.NotAfter, "err", err)
		c.scheduleLocked(sl, sl.retry)
		return
	}
	c.log.Debug("svid renewed", "spiffe_id", e.SpiffeID, "serial", svid.Serial, "not_after", svid.NotAfter)
	c.installLocked(sl, svid)
}

// nextRetry doubles the backoff, within [minRetry, maxRetry].
func nextRetry(prev time.Duration) time.Duration {
	return min(max(2*prev, minRetry), maxRetry)
}

// mintFailedOnce records a failed first mint of a held identity and
// retries it with backoff; the caller is served everything else meanwhile.
func (c *Cache) mintFailedOnce(sl *slot, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mintFailedLocked(sl, err)
}

func (c *Cache) mintFailedLocked(sl *slot, err error) {
	c.mintFailed(err, false)
	if c.closed || c.slots[sl.entry.ID] != sl || sl.svid != nil {
		return // replaced, or another attempt succeeded meanwhile
	}
	if sl.refs == 0 {
		// Nobody holds it any more: no retry, the next holder tries anew.
		return
	}
	sl.retry = nextRetry(sl.retry)
	c.log.Error("cannot mint svid; the caller gets its other identities and the bundle, retrying",
		"entry_id", sl.entry.ID, "spiffe_id", sl.entry.SpiffeID, "retry_in", sl.retry, "err", err)
	c.scheduleLocked(sl, sl.retry)
}
