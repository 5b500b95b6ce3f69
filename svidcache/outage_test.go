package svidcache

import (
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
)

// newHarnessWith is newHarness with cfg's policy fields (and OnChange)
// applied; it shares the clock and signer passed, if any, so a second
// cache can play "the same node after a restart".
func newHarnessWith(t *testing.T, clock *fakeclock.Clock, signer *caSigner, cfg Config) *harness {
	t.Helper()
	if clock == nil {
		clock = fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	}
	if signer == nil {
		signer = newCASigner(t, clock)
	}
	h := &harness{t: t, clock: clock, signer: signer, matcher: &selMatcher{entries: map[string][]Entry{}}}
	cfg.Signer, cfg.Matcher, cfg.Clock = h.signer, h.matcher, h.clock
	cfg.MintFailed = func(err error, renewal bool) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.failures = append(h.failures, failure{err, renewal})
	}
	h.cache = New(cfg)
	t.Cleanup(h.cache.Close)
	h.cache.SetBundles(X509Bundle(td, []*x509.Certificate{h.signer.a.Root()}, nil, false), nil)
	return h
}

func (h *harness) renewAt(id string) time.Time {
	h.cache.mu.Lock()
	defer h.cache.mu.Unlock()
	return h.cache.slots[id].renewAt
}

// waitCalls polls (fake-clock timers due at once run on goroutines) until
// the signer has been asked n times in all.
func (h *harness) waitCalls(n int) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.signer.total() < n {
		if time.Now().After(deadline) {
			h.t.Fatalf("signer asked %d times, want %d", h.signer.total(), n)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
}

// An SVID whose renewals all fail is withdrawn at its NotAfter: the
// subscriber is told and its snapshot no longer holds it (it keeps the
// bundle); the slot keeps retrying, and the next success serves again.
func TestExpiredSVIDIsWithdrawn(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("web"), entry("api"))
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	snap := sub.Snapshot()
	if len(snap.SVIDs) != 2 {
		t.Fatalf("served %d SVIDs, want 2", len(snap.SVIDs))
	}
	notAfter := snap.SVIDs[0].NotAfter
	h.signer.setFail("web", errSignerDown)

	h.clock.Advance(notAfter.Sub(h.clock.Now()) - time.Second)
	got := serials(sub.Snapshot())
	if _, ok := got["web"]; !ok {
		t.Fatal("web withdrawn before its NotAfter")
	}
	drained(sub.Changed())
	before := len(h.signer.callTimes("web"))

	h.clock.Advance(time.Second)
	if !drained(sub.Changed()) {
		t.Fatal("the subscriber was not told its SVID expired")
	}
	snap = sub.Snapshot()
	for _, s := range snap.SVIDs {
		if s.EntryID == "web" {
			t.Fatalf("the snapshot still holds web's expired SVID (not after %s, now %s)", s.NotAfter, h.clock.Now())
		}
		if !h.clock.Now().Before(s.NotAfter) {
			t.Fatalf("the snapshot holds an expired SVID for %s", s.EntryID)
		}
	}
	if len(snap.SVIDs) != 1 || snap.SVIDs[0].EntryID != "api" || len(snap.Bundles) != 1 {
		t.Fatalf("after web expired the snapshot holds %v and %d bundle(s), want api's SVID and the bundle", serials(snap), len(snap.Bundles))
	}
	if held := h.cache.Held(); len(held) != 1 || held[0].Entry.ID != "api" {
		t.Fatalf("Held lists %d SVIDs after web expired, want api's only", len(held))
	}

	if n := h.cache.Expired(); n != 1 {
		t.Fatalf("Expired() = %d, want 1", n)
	}

	// Still retrying, at the capped backoff.
	h.clock.Advance(maxRetry)
	if n := len(h.signer.callTimes("web")); n <= before {
		t.Fatalf("no renewal attempt after expiry (%d attempts, %d before)", n, before)
	}
	h.signer.setFail("web", nil)
	h.clock.Advance(maxRetry)
	if _, ok := serials(sub.Snapshot())["web"]; !ok {
		t.Fatal("web not served again once the signer came back")
	}
	if n := h.cache.Expired(); n != 0 {
		t.Fatalf("Expired() = %d after the renewal, want 0", n)
	}
}

// The availability-target policy, at its exact window edges: renewed when
// the target is left, no later than half the life, no sooner than a tenth,
// jitter only earlier.
func TestTargetDelayWindows(t *testing.T) {
	const day = 24 * time.Hour
	for _, tc := range []struct {
		target        time.Duration
		latest, first time.Duration // u=0, u→1
	}{
		{12 * time.Hour, 12 * time.Hour, 10*time.Hour + 48*time.Minute},       // half-life, as today
		{6 * time.Hour, 12 * time.Hour, 10*time.Hour + 48*time.Minute},        // never later than half-life
		{20 * time.Hour, 4 * time.Hour, 3*time.Hour + 36*time.Minute},         // renewed with 20h left
		{30 * time.Hour, 144 * time.Minute, 129*time.Minute + 36*time.Second}, // unreachable: a tenth of the life
		{day, 144 * time.Minute, 129*time.Minute + 36*time.Second},            // ditto
		{23 * time.Hour, 144 * time.Minute, 129*time.Minute + 36*time.Second}, // 1h would be under a tenth
		{21 * time.Hour, 3 * time.Hour, 2*time.Hour + 42*time.Minute},         // 3h: above the floor
		{time.Nanosecond, 12 * time.Hour, 10*time.Hour + 48*time.Minute},      // tiny target: half-life
	} {
		if got := targetDelay(day, tc.target, 0); got != tc.latest {
			t.Errorf("target %s: renew at %s of a 24h life at the latest, want %s", tc.target, got, tc.latest)
		}
		if got := targetDelay(day, tc.target, 0.999999999); got-tc.first > time.Millisecond || got < tc.first {
			t.Errorf("target %s: renew at %s at the earliest, want %s", tc.target, got, tc.first)
		}
	}
}

// Through the cache, on the fake clock: 24h SVIDs under a 20h target renew
// within [3h36m, 4h] of their issue, none before, all by then.
func TestAvailabilityTargetRenewsEarly(t *testing.T) {
	h := newHarnessWith(t, nil, nil, Config{AvailabilityTarget: 20 * time.Hour})
	h.signer.ttl = 24 * time.Hour
	var es []Entry
	for _, id := range []string{"a", "b", "c", "d", "e", "f", "g", "h"} {
		es = append(es, entry(id))
	}
	h.matcher.set("s", es...)
	start := h.clock.Now()
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	first := serials(sub.Snapshot())
	for _, e := range es {
		if d := h.renewAt(e.ID).Sub(start); d < 3*time.Hour+36*time.Minute || d > 4*time.Hour {
			t.Errorf("slot %s renews after %s, want within [3h36m, 4h]", e.ID, d)
		}
	}
	h.clock.Advance(3*time.Hour + 36*time.Minute - time.Second)
	if got := h.signer.total(); got != len(es) {
		t.Fatalf("%d signs before 3h36m, want %d", got, len(es))
	}
	h.clock.Advance(24*time.Minute + time.Second)
	if got := h.signer.total(); got != 2*len(es) {
		t.Fatalf("%d signs by 4h, want %d", got, 2*len(es))
	}
	for id, s := range serials(sub.Snapshot()) {
		if s == first[id] {
			t.Errorf("%s not renewed by 4h", id)
		}
	}

	// The default policy is unchanged: half-life ±10%.
	d := newHarnessWith(t, nil, nil, Config{})
	d.signer.ttl = 24 * time.Hour
	d.matcher.set("s", entry("x"))
	d.subscribe(identity.Caller{Selectors: []string{"s"}})
	if at := d.renewAt("x").Sub(d.clock.Now()); at < 10*time.Hour+48*time.Minute || at > 13*time.Hour+12*time.Minute {
		t.Errorf("default policy renews a 24h SVID after %s, want within [10h48m, 13h12m]", at)
	}
}

// A seeded SVID (a previous run's) is served to its first subscriber
// without a sign, even past its renewal point while the signer is down;
// it is renewed when the signer is back; an expired one is refused.
func TestSeedServesKeptSVIDs(t *testing.T) {
	clock := fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	first := newHarnessWith(t, clock, nil, Config{})
	first.matcher.set("s", entry("web"), entry("api"))
	sub := first.subscribe(identity.Caller{Selectors: []string{"s"}})
	want := serials(sub.Snapshot())
	held := first.cache.Held()
	if len(held) != 2 {
		t.Fatalf("Held lists %d SVIDs, want 2", len(held))
	}
	renewAt := first.renewAt("web")
	first.cache.Close()

	// "Restart" on the same signer, which is now unreachable, after the
	// renewal point.
	first.signer.setFail("*", errSignerDown)
	clock.Advance(renewAt.Sub(clock.Now()) + 5*time.Minute)
	h := newHarnessWith(t, clock, first.signer, Config{})
	h.matcher.set("s", entry("web"), entry("api"))
	for _, hd := range held {
		if err := h.cache.Seed(hd.Entry, rawChain(hd.SVID), hd.SVID.Key.(*ecdsa.PrivateKey)); err != nil {
			t.Fatalf("seed %s: %v", hd.Entry.ID, err)
		}
	}
	calls := h.signer.total()
	sub = h.subscribe(identity.Caller{Selectors: []string{"s"}})
	if got := serials(sub.Snapshot()); got["web"] != want["web"] || got["api"] != want["api"] {
		t.Fatalf("after the restart the subscriber got %v, want the kept %v", got, want)
	}
	// Due: renewal was tried at once (and failed); nothing was issued.
	h.waitCalls(calls + 2)

	h.signer.setFail("*", nil)
	h.clock.Advance(maxRetry)
	got := serials(sub.Snapshot())
	if got["web"] == want["web"] || got["api"] == want["api"] || len(got) != 2 {
		t.Fatalf("kept SVIDs not renewed once the signer was back: %v (kept %v)", got, want)
	}

	// An expired SVID is refused.
	x := newHarnessWith(t, clock, first.signer, Config{})
	clock.Advance(2 * time.Hour)
	if err := x.cache.Seed(held[0].Entry, rawChain(held[0].SVID), held[0].SVID.Key.(*ecdsa.PrivateKey)); !errors.Is(err, ErrExpired) {
		t.Fatalf("seeding an expired SVID: %v, want ErrExpired", err)
	}
	if n := len(x.cache.Held()); n != 0 {
		t.Fatalf("%d SVIDs held after refusing an expired one", n)
	}
}

func rawChain(s *identity.SVID) [][]byte {
	var out [][]byte
	for _, c := range s.Certs {
		out = append(out, c.Raw)
	}
	return out
}

// RenewDue renews at once everything past its renewal point (whatever its
// backoff step), so that the renewals that fell due during an outage go
// to the signer together.
func TestRenewDueRenewsOverdueTogether(t *testing.T) {
	var changes atomic.Int32
	h := newHarnessWith(t, nil, nil, Config{OnChange: func() { changes.Add(1) }})
	var es []Entry
	for _, id := range []string{"a", "b", "c", "d", "e", "f"} {
		es = append(es, entry(id))
	}
	h.matcher.set("s", es...)
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	old := serials(sub.Snapshot())
	if n := changes.Load(); n != int32(len(es)) {
		t.Fatalf("OnChange called %d times for %d mints", n, len(es))
	}
	h.signer.setFail("*", errSignerDown)
	h.clock.Advance(40 * time.Minute) // every slot past its point, retrying at various steps
	h.signer.setFail("*", nil)
	calls := h.signer.total()
	// Nothing is due before its time: a fresh slot is not renewed.
	if n := h.cache.RenewDue(); n != len(es) {
		t.Fatalf("RenewDue scheduled %d, want %d", n, len(es))
	}
	h.waitCalls(calls + len(es))
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := serials(sub.Snapshot())
		renewed := 0
		for id, s := range got {
			if s != old[id] {
				renewed++
			}
		}
		if renewed == len(es) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d renewed after RenewDue", renewed, len(es))
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	if n := h.cache.RenewDue(); n != 0 {
		t.Fatalf("RenewDue right after renewing scheduled %d, want 0", n)
	}
}

// An identity that expired in a workload's hands still counts after the
// workload lets go (a Workload API stream ends when nothing is left, and
// its client retries), until RenewDue, with the signer back, finds nobody
// holding it.
func TestExpiredCountsUntilRenewDueForgetsIt(t *testing.T) {
	h := newHarness(t)
	h.matcher.set("s", entry("web"))
	sub := h.subscribe(identity.Caller{Selectors: []string{"s"}})
	notAfter := sub.Snapshot().SVIDs[0].NotAfter
	h.signer.setFail("*", errSignerDown)
	h.clock.Advance(notAfter.Sub(h.clock.Now()))
	if n := h.cache.Expired(); n != 1 {
		t.Fatalf("Expired() = %d at NotAfter, want 1", n)
	}
	sub.Close()
	if n := h.cache.Expired(); n != 1 {
		t.Fatalf("Expired() = %d once the workload let go, want 1", n)
	}
	h.signer.setFail("*", nil)
	if n := h.cache.RenewDue(); n != 0 {
		t.Fatalf("RenewDue scheduled %d renewals for nobody", n)
	}
	if n := h.cache.Expired(); n != 0 || h.slotCount() != 0 {
		t.Fatalf("after RenewDue: Expired() = %d, %d slots; want 0, 0", n, h.slotCount())
	}
}
