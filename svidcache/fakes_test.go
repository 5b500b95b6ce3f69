package svidcache

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// caSigner is the Signer seam with a real CA behind it: it checks the CSR
// and signs a real X.509-SVID, so the cache is tested on real certificates.
// fail, per entry ID (or "*" for all), makes it refuse.
type caSigner struct {
	a     *ca.Authority
	clock Clock
	ttl   time.Duration

	mu    sync.Mutex
	fail  map[string]error
	calls map[string][]time.Time // by entry ID: when each sign was asked
	// block, if set, holds every sign until ctx ends.
	block bool
	// wrongKey signs a fresh key instead of the CSR's.
	wrongKey bool
}

func newCASigner(t *testing.T, clock Clock) *caSigner {
	t.Helper()
	a, err := ca.NewRoot(td, ca.KeyP256, 30*24*time.Hour, clock.Now().Add(-time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	return &caSigner{a: a, clock: clock, ttl: time.Hour, fail: map[string]error{}, calls: map[string][]time.Time{}}
}

func (s *caSigner) SignX509SVID(ctx context.Context, e Entry, csrDER []byte) ([][]byte, error) {
	now := s.clock.Now()
	s.mu.Lock()
	s.calls[e.ID] = append(s.calls[e.ID], now)
	err := s.fail[e.ID]
	if err == nil {
		err = s.fail["*"]
	}
	block, wrongKey := s.block, s.wrongKey
	s.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	csr, err := ca.ParseCSR(csrDER)
	if err != nil {
		return nil, err
	}
	return s.signPub(e, csr.PublicKey, now, wrongKey)
}

// signPub certifies pub (or, with wrongKey, a fresh key) for e.
func (s *caSigner) signPub(e Entry, pub crypto.PublicKey, now time.Time, wrongKey bool) ([][]byte, error) {
	if wrongKey {
		k, err := ca.GenerateKey(ca.KeyP256)
		if err != nil {
			return nil, err
		}
		pub = k.Public()
	}
	id, err := spiffeid.FromString(e.SpiffeID)
	if err != nil {
		return nil, err
	}
	ttl := e.TTL
	if ttl == 0 {
		ttl = s.ttl
	}
	svid, err := s.a.SignX509SVID(ca.SVIDRequest{ID: id, PublicKey: pub, DNSNames: e.DNSNames, TTL: ttl, Now: now})
	if err != nil {
		return nil, err
	}
	return append([][]byte{svid.CertDER}, svid.ChainDER...), nil
}

func (s *caSigner) setFail(id string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		delete(s.fail, id)
	} else {
		s.fail[id] = err
	}
}

func (s *caSigner) callTimes(id string) []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls[id])
}

func (s *caSigner) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		n += len(c)
	}
	return n
}

// selMatcher serves, for each of a caller's selectors, the entries under
// it; admit, if set, refuses.
type selMatcher struct {
	mu      sync.Mutex
	entries map[string][]Entry
	admit   error
}

func (m *selMatcher) Match(c identity.Caller) []Entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Entry
	for _, s := range c.Selectors {
		out = append(out, m.entries[s]...)
	}
	return out
}

func (m *selMatcher) Admit(identity.Caller) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.admit
}

func (m *selMatcher) set(sel string, es ...Entry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.entries[sel] = es
}

type failure struct {
	err     error
	renewal bool
}

type harness struct {
	t       *testing.T
	clock   *fakeclock.Clock
	signer  *caSigner
	matcher *selMatcher
	cache   *Cache

	mu       sync.Mutex
	failures []failure
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{t: t, clock: fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)), matcher: &selMatcher{entries: map[string][]Entry{}}}
	h.signer = newCASigner(t, h.clock)
	h.cache = New(Config{Signer: h.signer, Matcher: h.matcher, Clock: h.clock, MintFailed: func(err error, renewal bool) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.failures = append(h.failures, failure{err, renewal})
	}})
	t.Cleanup(h.cache.Close)
	h.cache.SetBundles(X509Bundle(td, []*x509.Certificate{h.signer.a.Root()}, nil, false), nil)
	return h
}

func (h *harness) failureCount() (first, renewals int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, f := range h.failures {
		if f.renewal {
			renewals++
		} else {
			first++
		}
	}
	return first, renewals
}

func (h *harness) subscribe(c identity.Caller) *Subscription {
	h.t.Helper()
	sub, err := h.cache.Subscribe(context.Background(), c)
	if err != nil {
		h.t.Fatalf("Subscribe: %v", err)
	}
	s := sub.(*Subscription)
	h.t.Cleanup(s.Close)
	return s
}

func entry(id string) Entry {
	return Entry{ID: id, SpiffeID: td.IDString() + "/" + id, Hint: "hint-" + id}
}

// serials lists the snapshot's SVID serials by entry ID.
func serials(snap *identity.Snapshot) map[string]string {
	out := map[string]string{}
	for _, s := range snap.SVIDs {
		out[s.EntryID] = s.Serial
	}
	return out
}

// drained reports whether a signal was pending on ch, consuming it.
func drained(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

var errSignerDown = errors.New("signer down")

// keyCASigner is a caSigner that is also a KeySigner, as the server's
// local signer is; it counts which of its two paths the cache took.
type keyCASigner struct {
	*caSigner
	csrCalls, keyCalls int // under caSigner.mu
}

func (s *keyCASigner) SignX509SVID(ctx context.Context, e Entry, csrDER []byte) ([][]byte, error) {
	s.mu.Lock()
	s.csrCalls++
	s.mu.Unlock()
	return s.caSigner.SignX509SVID(ctx, e, csrDER)
}

func (s *keyCASigner) SignX509SVIDKey(_ context.Context, e Entry, pub crypto.PublicKey) ([][]byte, error) {
	now := s.clock.Now()
	s.mu.Lock()
	s.keyCalls++
	s.calls[e.ID] = append(s.calls[e.ID], now)
	err := s.fail[e.ID]
	wrongKey := s.wrongKey
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return s.signPub(e, pub, now, wrongKey)
}
