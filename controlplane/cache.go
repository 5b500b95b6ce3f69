package controlplane

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/svidcache"
)

// The live SVIDs of connected workloads are kept by svidcache; the server
// gives it a local Signer (the mint path: limits, inventory row, lineage),
// a Matcher (the entry index, direct IDs, bans) and its clock.

// ErrClosed is returned by Subscribe once the server is shutting down.
var ErrClosed = svidcache.ErrClosed

func (s *Server) newCache() *svidcache.Cache {
	return svidcache.New(svidcache.Config{
		Signer:  localSigner{s},
		Matcher: &s.match,
		Clock:   serverClock{s},
		Logger:  s.log,
		MintFailed: func(err error, renewal bool) {
			if renewal {
				s.metrics.RenewalFailures.Inc()
			}
			s.metrics.MintFailures.WithLabelValues(mintFailureReason(err)).Inc()
		},
	})
}

// serverClock is the server's injected clock as a svidcache.Clock.
type serverClock struct{ s *Server }

func (c serverClock) Now() time.Time { return c.s.now() }
func (c serverClock) AfterFunc(d time.Duration, f func()) func() bool {
	return c.s.afterFunc(d, f)
}

// localSigner signs the cache's keys with the active CA, through the
// signing limiter, recording each SVID in the inventory under the entry it
// serves. It is a svidcache.KeySigner: the cache in this process hands it
// the public key, so no CSR is made, signed, checked and parsed per SVID.
type localSigner struct{ s *Server }

var _ svidcache.KeySigner = localSigner{}

// SignX509SVID certifies a CSR's key; the cache uses SignX509SVIDKey, this
// keeps localSigner a complete Signer.
func (l localSigner) SignX509SVID(ctx context.Context, e svidcache.Entry, csr []byte) ([][]byte, error) {
	// The CSR comes from the cache in this process: parsed for its key,
	// its self-signature not re-checked (see MintRequest.publicKey).
	req, err := x509.ParseCertificateRequest(csr)
	if err != nil {
		return nil, fmt.Errorf("parse the cache's CSR: %w", err)
	}
	return l.SignX509SVIDKey(ctx, e, req.PublicKey)
}

// SignX509SVIDKey certifies pub, the public half of a key the cache made.
func (l localSigner) SignX509SVIDKey(ctx context.Context, e svidcache.Entry, pub crypto.PublicKey) ([][]byte, error) {
	s := l.s
	entryID := s.entryIDForInventory(e)
	svid, err := s.MintX509SVID(ctx, MintRequest{
		SpiffeID:  e.SpiffeID,
		publicKey: pub,
		TTL:       e.TTL, // 0: the server default; mint clamps either to the CA's life
		ClampTTL:  true,
		DNSNames:  e.DNSNames,
		EntryID:   entryID,
		Requester: requesterFor(e),
	})
	if err != nil {
		return nil, err
	}
	s.lin.note(svid.Serial, entryID, svid.NotAfter, s.now())
	return append([][]byte{svid.CertDER}, svid.ChainDER...), nil
}

// entryIDForInventory is the entry an SVID of slot e is issued under: the
// entry itself, or for a caller holding its ID through a certificate, the
// entry that certificate was issued under (none for join tokens).
func (s *Server) entryIDForInventory(e svidcache.Entry) string {
	if !svidcache.IsDirect(e.ID) {
		return e.ID
	}
	if serial := svidcache.DirectSerial(e.ID); serial != "" {
		entryID, _ := s.lin.cached(serial)
		return entryID
	}
	return ""
}

// requesterFor is the inventory Requester of an SVID of slot e; for remote
// callers it names the credential, so that revoking that credential
// reaches its renewals (withDescendants).
func requesterFor(e svidcache.Entry) string {
	switch {
	case !svidcache.IsDirect(e.ID):
		return "workload"
	case svidcache.DirectSerial(e.ID) != "":
		return requesterViaSVID(svidcache.DirectSerial(e.ID))
	default:
		return requesterViaToken
	}
}

// cacheEntry is what the cache serves of a registration entry.
func cacheEntry(e store.Entry) svidcache.Entry {
	return svidcache.Entry{ID: e.ID, SpiffeID: e.SpiffeID, DNSNames: e.DNSNames, TTL: e.TTL, Hint: entryHint(e)}
}

// matcher is the server's svidcache.Matcher: direct IDs (certificate or
// token callers) first, then the entries a caller's selectors match.
type matcher struct {
	srv *Server
	mu  sync.Mutex
	// banned are directly held IDs (certificate or token callers) revoked
	// by SPIFFE ID: not served again until a new token is made for them.
	banned map[string]bool
}

// Match lists the entries a caller may hold, in default-first order.
func (m *matcher) Match(c identity.Caller) []svidcache.Entry {
	var out []svidcache.Entry
	m.mu.Lock()
	for _, id := range c.IDs {
		if !m.banned[id.String()] {
			key := svidcache.DirectKey(id.String(), normSerial(c.Serial))
			// The hint is the slot key, as entryHint gives an entry
			// without one its ID.
			out = append(out, svidcache.Entry{ID: key, SpiffeID: id.String(), Hint: key})
		}
	}
	m.mu.Unlock()
	for _, e := range m.srv.entries.match(c.Selectors) {
		if e.ParentID != "" {
			continue // one agent's to serve, not the server's own socket's
		}
		if !slices.ContainsFunc(out, func(o svidcache.Entry) bool { return o.SpiffeID == e.SpiffeID && svidcache.IsDirect(o.ID) }) {
			out = append(out, cacheEntry(e))
		}
	}
	return out
}

// Admit is ErrCredentialRevoked if caller's certificate was revoked, or an
// ID it holds directly banned, while it was subscribing.
func (m *matcher) Admit(c identity.Caller) error {
	if c.Serial != "" && m.srv.serialRevoked(c.Serial) {
		return fmt.Errorf("%w: client certificate %s", ErrCredentialRevoked, normSerial(c.Serial))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range c.IDs {
		if m.banned[id.String()] {
			return fmt.Errorf("%w: identity %s", ErrCredentialRevoked, id)
		}
	}
	return nil
}

func (m *matcher) ban(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.banned == nil {
		m.banned = map[string]bool{}
	}
	m.banned[id] = true
}

func (m *matcher) unban(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.banned, id)
}

// servedBy counts the served SVIDs issuer signed.
func (s *Server) servedBy(issuer *x509.Certificate) int {
	return s.ids.Served(func(leaf *x509.Certificate) bool { return signedBy(leaf, issuer) })
}

// SubscribeBundles subscribes a caller to the trust bundles alone, minting
// nothing: the Workload API's verifier RPCs use it.
func (s *Server) SubscribeBundles(ctx context.Context, caller identity.Caller) (identity.Subscription, error) {
	return s.ids.SubscribeBundles(ctx, caller)
}
