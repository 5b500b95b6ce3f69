package controlplane

import (
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"

	"github.com/meshid/meshid/ca"
)

// BundleRefreshHint is the spiffe_refresh_hint of the trust bundle
// document: how often a federated peer should fetch it again. A prepared
// CA is published at least a publication window (never under one SVID
// TTL) before it signs, so peers polling at this rate learn of it in time.
const BundleRefreshHint = 5 * time.Minute

// SPIFFEBundle is the trust domain's bundle as the SPIFFE Trust Domain and
// Bundle spec describes it: the X.509 authorities ("x509-svid" keys), the
// JWT signing keys with their key IDs ("jwt-svid" keys), a refresh hint and
// a sequence number.
//
// The sequence is the time (Unix milliseconds) the current set of keys
// came to be: the newest key's creation or the departure of the last key that left.
// It grows with every change, across restarts, without a counter in the
// store.
func (s *Server) SPIFFEBundle() (*spiffebundle.Bundle, error) {
	now := s.now()
	b := spiffebundle.New(s.td)
	for _, c := range s.BundleCerts() {
		b.AddX509Authority(c)
	}
	s.mu.RLock()
	cas := slices.Clone(s.cas)
	jwtKeys := slices.Clone(s.jwtKeys)
	s.mu.RUnlock()
	var changed time.Time
	later := func(t time.Time) {
		if t.After(changed) && !t.After(now) {
			changed = t
		}
	}
	for _, v := range cas {
		if v.inBundle(now) {
			later(v.rec.CreatedAt)
			continue
		}
		left := v.cert.NotAfter
		if last := v.lastNotAfter.Load(); last != 0 && time.Unix(0, last).Before(left) {
			left = time.Unix(0, last)
		}
		later(left)
	}
	for _, v := range jwtKeys {
		if now.After(v.rec.NotAfter) {
			later(v.rec.NotAfter)
			continue
		}
		kid, err := ca.JWTKeyID(v.pub)
		if err != nil {
			return nil, err
		}
		if err := b.AddJWTAuthority(kid, v.pub); err != nil {
			return nil, fmt.Errorf("bundle: JWT key %s: %w", kid, err)
		}
		later(v.rec.CreatedAt)
	}
	b.SetRefreshHint(BundleRefreshHint)
	b.SetSequenceNumber(uint64(max(changed.UnixMilli(), 0)))
	return b, nil
}
