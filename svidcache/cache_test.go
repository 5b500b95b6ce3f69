package svidcache

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
)

func TestRenewDelayIsHalfLifeWithinJitter(t *testing.T) {
	life := time.Hour
	for _, tc := range []struct {
		u        float64
		want     time.Duration
		tolerate time.Duration
	}{
		{0, 27 * time.Minute, 0},                            // 0.5 x 0.9
		{0.5, 30 * time.Minute, 0},                          // exactly half
		{0.999999, 33 * time.Minute, 10 * time.Millisecond}, // 0.5 x 1.1
	} {
		got := renewDelay(life, tc.u)
		if d := got - tc.want; d < -tc.tolerate || d > tc.tolerate {
			t.Errorf("renewDelay(1h, %v) = %s, want %s", tc.u, got, tc.want)
		}
	}
}

// Every slot renews between 45% and 55% of its life, the slots do not all
// renew at once, and nothing renews before its point.
func TestRenewalAtHalfLifeWithJitter(t *testing.T) {
	h := newHarness(t)
	const n = 40
	var es []Entry
	for i := range n {
		es = append(es, entry(fmt.Sprintf("e%02d", i)))
	}
	h.matcher.set("unix:uid:1", es...)
	start := h.clock.Now()
	sub := h.subscribe(identity.Caller{Selectors: []string{"unix:uid:1"}})
	first := serials(sub.Snapshot())
	if len(first) != n {
		t.Fatalf("served %d SVIDs, want %d", len(first), n)
	}
	distinct := map[time.Time]bool{}
	h.cache.mu.Lock()
	for k, sl := range h.cache.slots {
		d := sl.renewAt.Sub(start)
		if d < 27*time.Minute || d > 33*time.Minute {
			t.Errorf("slot %s renews after %s, want within 27m..33m of a 1h life", k, d)
		}
		distinct[sl.renewAt] = true
	}
	h.cache.mu.Unlock()
	if len(distinct) < n/2 {
		t.Errorf("only %d distinct renewal times for %d slots: no jitter", len(distinct), n)
	}

	h.clock.Advance(27*time.Minute - time.Second)
	if got := h.signer.total(); got != n {
		t.Fatalf("%d signs before the earliest renewal point, want %d", got, n)
	}
	drained(sub.Changed())
	h.clock.Advance(6*time.Minute + 2*time.Second)
	if got := h.signer.total(); got != 2*n {
		t.Fatalf("%d signs after the latest renewal point, want %d (each renewed once)", got, 2*n)
	}
	if !drained(sub.Changed()) {
		t.Fatal("renewals were not signalled")
	}
	for id, serial := range serials(sub.Snapshot()) {
		if serial == first[id] {
			t.Errorf("entry %s still serves serial %s after its renewal", id, serial)
		}
	}
}

// A failed renewal keeps the SVID in hand and retries after 1s, 2s, 4s...
// until the signer is back; then the backoff starts over.
func TestBackoffAfterSignerFailure(t *testing.T) {
	h := newHarness(t)
	e := entry("web")
	h.matcher.set("s", e)
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	old := sub.Snapshot().SVIDs[0]
	h.cache.mu.Lock()
	renewAt := h.cache.slots["web"].renewAt
	h.cache.mu.Unlock()

	h.signer.setFail("web", errSignerDown)
	h.clock.Advance(renewAt.Sub(h.clock.Now()))
	h.clock.Advance(1*time.Second + 2*time.Second + 4*time.Second + 8*time.Second)
	calls := h.signer.callTimes("web")
	if len(calls) != 6 { // first issue, the renewal, 4 retries
		t.Fatalf("%d sign calls, want 6: %v", len(calls), calls)
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second} {
		if got := calls[i+2].Sub(calls[i+1]); got != want {
			t.Errorf("retry %d came %s after the previous attempt, want %s", i+1, got, want)
		}
	}
	if _, renewals := h.failureCount(); renewals != 5 {
		t.Errorf("%d renewal failures reported, want 5", renewals)
	}
	if got := sub.Snapshot().SVIDs; len(got) != 1 || got[0].Serial != old.Serial {
		t.Fatalf("during the outage the snapshot holds %v, want the old SVID %s", got, old.Serial)
	}

	h.signer.setFail("web", nil)
	h.clock.Advance(16 * time.Second)
	now := sub.Snapshot().SVIDs
	if len(now) != 1 || now[0].Serial == old.Serial {
		t.Fatal("the SVID was not replaced once the signer came back")
	}
	h.cache.mu.Lock()
	retry := h.cache.slots["web"].retry
	h.cache.mu.Unlock()
	if retry != 0 {
		t.Errorf("backoff after a success is %s, want it reset", retry)
	}

	// Backoff is capped.
	if got := nextRetry(maxRetry); got != maxRetry {
		t.Errorf("nextRetry(max) = %s, want %s", got, maxRetry)
	}
}

// An idle slot's SVID is handed to the next caller until its renewal
// point, without a sign and without being renewed while nobody holds it;
// after that point the next caller gets a new one.
func TestIdleReuseWithinRenewalPoint(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("api"))
	c := identity.Caller{Selectors: []string{"s"}}
	sub1 := h.subscribe(c)
	serial := sub1.Snapshot().SVIDs[0].Serial
	h.cache.mu.Lock()
	renewAt := h.cache.slots["api"].renewAt
	h.cache.mu.Unlock()
	sub1.Close()

	h.clock.Advance(renewAt.Sub(h.clock.Now()) - time.Second)
	if got := h.signer.total(); got != 1 {
		t.Fatalf("%d signs while idle, want 1 (an idle slot is not renewed)", got)
	}
	sub2 := h.subscribe(c)
	if got := sub2.Snapshot().SVIDs[0].Serial; got != serial {
		t.Fatalf("second caller within the renewal point got %s, want the idle SVID %s", got, serial)
	}
	if got := h.signer.total(); got != 1 {
		t.Fatalf("%d signs after reuse, want 1", got)
	}
	sub2.Close()

	h.clock.Advance(2 * time.Second)
	sub3 := h.subscribe(c)
	if got := sub3.Snapshot().SVIDs[0].Serial; got == serial {
		t.Fatal("a caller after the renewal point got the old SVID")
	}
	if got := h.signer.total(); got != 2 {
		t.Fatalf("%d signs, want 2", got)
	}

	// SweepIdle forgets idle slots past their renewal point, not others.
	sub3.Close()
	h.cache.SweepIdle(h.clock.Now())
	if n := h.slotCount(); n != 1 {
		t.Errorf("%d slots after sweeping a fresh idle one, want 1", n)
	}
	h.cache.SweepIdle(h.clock.Now().Add(time.Hour))
	if n := h.slotCount(); n != 0 {
		t.Errorf("%d slots after sweeping past the renewal point, want 0", n)
	}
}

func (h *harness) slotCount() int {
	h.cache.mu.Lock()
	defer h.cache.mu.Unlock()
	return len(h.cache.slots)
}

// Many changes before the subscriber looks leave one pending signal, and
// the snapshot then holds the latest of everything.
func TestChangedIsCoalesced(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("a"), entry("b"))
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	drained(sub.Changed())

	h.cache.SetBundles(X509Bundle(td, nil, [][]byte{{1}}, false), nil)
	h.cache.SetBundles(X509Bundle(td, nil, [][]byte{{2}}, false), nil)
	jb := &identity.JWTBundle{TrustDomain: td, JWKS: []byte(`{"keys":[]}`), Version: "j1"}
	h.cache.SetBundles(nil, jb)
	h.clock.Advance(time.Hour) // both SVIDs renew (and again)

	if got := len(sub.ch); got != 1 {
		t.Fatalf("%d pending signals, want exactly 1", got)
	}
	<-sub.Changed()
	snap := sub.Snapshot()
	if len(snap.Bundles) != 1 || len(snap.Bundles[0].CRLs) != 1 || snap.Bundles[0].CRLs[0][0] != 2 {
		t.Errorf("snapshot bundle %+v, want the last one set", snap.Bundles)
	}
	if len(snap.JWTBundles) != 1 || snap.JWTBundles[0].Version != "j1" {
		t.Errorf("snapshot JWT bundles %+v, want j1", snap.JWTBundles)
	}
	h.cache.mu.Lock()
	for k, sl := range h.cache.slots {
		if got := serials(snap)[k]; got != sl.svid.Serial {
			t.Errorf("snapshot serves %s for %s, the slot holds %s", got, k, sl.svid.Serial)
		}
	}
	h.cache.mu.Unlock()

	// An unchanged bundle is not a change.
	h.cache.SetBundles(X509Bundle(td, nil, [][]byte{{2}}, false), jb)
	if drained(sub.Changed()) {
		t.Error("re-setting the same bundles signalled a change")
	}
}

// One entry the signer refuses does not take the caller's others or its
// bundle: it is retried on its own, with backoff, and served once it signs.
func TestPerEntryIsolation(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("bad"), entry("good"))
	h.signer.setFail("bad", errSignerDown)
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	snap := sub.Snapshot()
	if got := serials(snap); len(got) != 1 || got["good"] == "" {
		t.Fatalf("served %v, want only the good entry", got)
	}
	if len(snap.Bundles) != 1 {
		t.Fatalf("the bundle was withheld with a failing entry")
	}
	if first, _ := h.failureCount(); first != 1 {
		t.Fatalf("%d first-mint failures reported, want 1", first)
	}
	// A second holder waits for the scheduled retry rather than adding a
	// sign of its own.
	h.subscribe(identity.Caller{Selectors: []string{"s"}})
	if got := len(h.signer.callTimes("bad")); got != 1 {
		t.Fatalf("%d signs of the failing entry after a second holder, want 1", got)
	}

	h.clock.Advance(time.Second + 2*time.Second)
	calls := h.signer.callTimes("bad")
	if len(calls) != 3 || calls[1].Sub(calls[0]) != time.Second || calls[2].Sub(calls[1]) != 2*time.Second {
		t.Fatalf("retries at %v, want after 1s then 2s", calls)
	}
	drained(sub.Changed())
	h.signer.setFail("bad", nil)
	h.clock.Advance(4 * time.Second)
	if !drained(sub.Changed()) {
		t.Fatal("the recovered entry was not signalled")
	}
	if got := serials(sub.Snapshot()); len(got) != 2 {
		t.Fatalf("served %v after recovery, want both", got)
	}

	// An extra entry (the server's own certificate) is not optional.
	h.signer.setFail("srv", errSignerDown)
	if _, err := h.cache.SubscribeWith(context.Background(), identity.Caller{}, entry("srv")); !errors.Is(err, errSignerDown) {
		t.Fatalf("SubscribeWith a failing extra entry: %v, want the signer's error", err)
	}
}

// A slot is renewed while anyone holds it and stops when the last holder
// lets go.
func TestRefCountRelease(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("shared"))
	c := identity.Caller{Selectors: []string{"s"}}
	a, b := h.subscribe(c), h.subscribe(c)
	if got := h.signer.total(); got != 1 {
		t.Fatalf("%d signs for two holders of one entry, want 1", got)
	}
	a.Close()
	h.clock.Advance(34 * time.Minute)
	if got := h.signer.total(); got != 2 {
		t.Fatalf("%d signs with one holder left past the renewal point, want 2", got)
	}
	if _, _, served := h.cache.Stats(h.clock.Now()); served != 1 {
		t.Fatalf("served %d, want 1", served)
	}
	b.Close()
	h.clock.Advance(2 * time.Hour)
	if got := h.signer.total(); got != 2 {
		t.Fatalf("%d signs after the last holder left, want 2 (no renewal)", got)
	}
	if _, _, served := h.cache.Stats(h.clock.Now()); served != 0 {
		t.Fatalf("served %d after release, want 0", served)
	}
}

// The key is made in the cache: the signer sees only a CSR, and a chain
// that certifies another key is refused.
func TestKeyIsMadeInTheCache(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("k"))
	svid := h.subscribe(identity.Caller{Selectors: []string{"s"}}).Snapshot().SVIDs[0]
	pub, ok := svid.Certs[0].PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(svid.Key.Public()) {
		t.Fatal("the served key does not match its certificate")
	}
	if svid.ID != spiffeid.RequireFromString(td.IDString()+"/k") || svid.Hint != "hint-k" || svid.EntryID != "k" {
		t.Errorf("svid %s hint %q entry %q", svid.ID, svid.Hint, svid.EntryID)
	}
	if len(svid.KeyDER) == 0 || len(svid.KeyPEM) == 0 || len(svid.ChainPEM) == 0 || svid.Serial != svid.Certs[0].SerialNumber.Text(16) {
		t.Error("svid is missing its encodings or serial")
	}

	h.signer.mu.Lock()
	h.signer.wrongKey = true
	h.signer.mu.Unlock()
	h.matcher.set("w", entry("w"))
	sub := h.subscribe(identity.Caller{Selectors: []string{"w"}})
	if got := sub.Snapshot().SVIDs; len(got) != 0 {
		t.Fatalf("served %d SVIDs certifying a key the cache did not make", len(got))
	}
}

// A KeySigner is handed the public key of the cache's own key, no CSR; the
// certificate it returns must be for that key, or nothing is served.
func TestKeySignerGetsTheCacheKeyWithoutCSR(t *testing.T) {
	clock := fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	signer := &keyCASigner{caSigner: newCASigner(t, clock)}
	m := &selMatcher{entries: map[string][]Entry{}}
	c := New(Config{Signer: signer, Matcher: m, Clock: clock})
	t.Cleanup(c.Close)
	m.set("s", entry("k"))
	sub, err := c.Subscribe(context.Background(), identity.Caller{Selectors: []string{"s"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	svids := sub.Snapshot().SVIDs
	if len(svids) != 1 {
		t.Fatalf("served %d SVIDs, want 1", len(svids))
	}
	pub, ok := svids[0].Certs[0].PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(svids[0].Key.Public()) {
		t.Fatal("the served certificate is not for the key the cache holds")
	}
	signer.mu.Lock()
	csrCalls, keyCalls := signer.csrCalls, signer.keyCalls
	signer.wrongKey = true
	signer.mu.Unlock()
	if csrCalls != 0 || keyCalls != 1 {
		t.Fatalf("signer asked %d times with a CSR and %d with the key, want 0 and 1", csrCalls, keyCalls)
	}
	m.set("w", entry("w"))
	wrong, err := c.Subscribe(context.Background(), identity.Caller{Selectors: []string{"w"}})
	if err != nil {
		t.Fatal(err)
	}
	defer wrong.Close()
	if got := wrong.Snapshot().SVIDs; len(got) != 0 {
		t.Fatalf("served %d SVIDs certifying a key the cache did not make", len(got))
	}
}

// Bundle subscriptions sign nothing, now or when entries change.
func TestSubscribeBundlesMintsNothing(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("x"))
	sub, err := h.cache.SubscribeBundles(context.Background(), identity.Caller{Selectors: []string{"s"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	h.matcher.set("s", entry("x"), entry("y"))
	h.cache.EntriesChanged(context.Background())
	snap := sub.Snapshot()
	if len(snap.SVIDs) != 0 || len(snap.Bundles) != 1 {
		t.Fatalf("bundle subscription holds %d SVIDs and %d bundles, want 0 and 1", len(snap.SVIDs), len(snap.Bundles))
	}
	if got := h.signer.total(); got != 0 {
		t.Fatalf("%d signs for a bundle subscription, want 0", got)
	}
	// It is still refused and ended like any other.
	h.matcher.mu.Lock()
	h.matcher.admit = errors.New("revoked")
	h.matcher.mu.Unlock()
	if _, err := h.cache.SubscribeBundles(context.Background(), identity.Caller{}); err == nil {
		t.Fatal("a refused caller got a bundle subscription")
	}
}

// Entries created and deleted are served and withdrawn at once.
func TestEntriesChanged(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("a"))
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	drained(sub.Changed())
	h.matcher.set("s", entry("b"))
	h.cache.EntriesChanged(context.Background())
	if !drained(sub.Changed()) {
		t.Fatal("re-match was not signalled")
	}
	if got := serials(sub.Snapshot()); len(got) != 1 || got["b"] == "" {
		t.Fatalf("served %v, want only b", got)
	}
	before := h.signer.total()
	h.clock.Advance(2 * time.Hour)
	if got := len(h.signer.callTimes("a")); got != 1 {
		t.Errorf("withdrawn entry signed %d times, want 1 (not renewed)", got)
	}
	if h.signer.total() == before {
		t.Error("the held entry was not renewed")
	}
}

// EndCallers ends a revoked caller's subscription and drops the slot only
// its own certificate could hold.
func TestEndCallers(t *testing.T) {
	h := newHarness(t)
	id := td.IDString() + "/remote"
	h.matcher.set("r", Entry{ID: DirectKey(id, "abc"), SpiffeID: id})
	sub := h.subscribe(identity.Caller{Selectors: []string{"r"}, Serial: "abc"})
	other := h.subscribe(identity.Caller{Selectors: []string{"none"}})
	drained(sub.Changed())
	errRevoked := errors.New("revoked")
	n := h.cache.EndCallers(func(c identity.Caller) bool { return c.Serial == "abc" }, func(identity.Caller) error { return errRevoked })
	if n != 1 {
		t.Fatalf("ended %d, want 1", n)
	}
	if !drained(sub.Changed()) || !errors.Is(sub.Err(), errRevoked) || len(sub.Snapshot().SVIDs) != 0 {
		t.Fatalf("ended subscription: err %v, %d SVIDs", sub.Err(), len(sub.Snapshot().SVIDs))
	}
	if other.Err() != nil {
		t.Fatal("an unrelated caller was ended")
	}
	if n := h.slotCount(); n != 0 {
		t.Fatalf("%d slots left, want the caller's own slot dropped", n)
	}
}

// Close cancels a renewal stuck in the signer and waits for it; Subscribe
// is refused afterwards.
func TestCloseCancelsAndWaitsForRenewals(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("a"))
	h.subscribe(identity.Caller{Selectors: []string{"s"}})
	h.signer.mu.Lock()
	h.signer.block = true
	h.signer.mu.Unlock()
	// The renewal runs on its own goroutine: due now.
	h.cache.RenewAll()
	deadline := time.Now().Add(10 * time.Second)
	for len(h.signer.callTimes("a")) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the renewal never reached the signer")
		}
		time.Sleep(time.Millisecond)
	}
	h.cache.Close() // returns only once the blocked sign has given up
	if _, err := h.cache.Subscribe(context.Background(), identity.Caller{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Subscribe after Close: %v, want ErrClosed", err)
	}
}
