package sds

import (
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/identity"
)

// Which bundle each stream holds, for the convergence gate of CA
// activation: a node agent reports these counts to the server, which
// activates a prepared CA only once (enough of) the proxies hold it.
//
// A stream counts once it asks for a name that carries the caller's own
// trust-domain bundle (ROOTCA, ALL, spiffe://<own td>). It holds the
// version of that bundle in the latest response it ACKed: a response not
// answered yet, or NACKed, leaves it where it was (Envoy keeps the last
// content it accepted). Only an answer to the latest response counts, as
// for flow control; an ACK the server ignores as stale makes the count
// lag, never run ahead.

// bundleHold is one stream's bundle state. wants and held are read
// without the stream's lock by BundleVersions; pending is guarded by the
// stream's mu.
type bundleHold struct {
	wants atomic.Bool
	held  atomic.Pointer[string]

	pending    string
	pendingSet bool
}

// sent records that the latest response carries own bundle version v
// (SotW: every response replaces what the client holds, so a response
// without the bundle sets "").
func (h *bundleHold) sent(v string) { h.pending, h.pendingSet = v, true }

// ack: the client accepted the latest response.
func (h *bundleHold) ack() {
	if h.pendingSet {
		v := h.pending
		h.held.Store(&v)
	}
	h.pending, h.pendingSet = "", false
}

// nack: the client rejected a response; it keeps what it held.
func (h *bundleHold) nack() { h.pending, h.pendingSet = "", false }

// bundleStreams is the server's set of open streams, for BundleVersions.
type bundleStreams struct {
	mu sync.Mutex
	m  map[*bundleHold]struct{}
}

func (b *bundleStreams) add(h *bundleHold) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m == nil {
		b.m = map[*bundleHold]struct{}{}
	}
	b.m[h] = struct{}{}
}

func (b *bundleStreams) remove(h *bundleHold) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.m, h)
}

// BundleVersions counts, at call time, the open streams that ask for the
// caller's own trust bundle, by the bundle version each has ACKed; the
// key "" counts those that have ACKed none yet. It takes no stream's lock.
func (s *Server) BundleVersions() map[string]int {
	out := map[string]int{}
	s.tracked.mu.Lock()
	defer s.tracked.mu.Unlock()
	for h := range s.tracked.m {
		if !h.wants.Load() {
			continue
		}
		v := ""
		if p := h.held.Load(); p != nil {
			v = *p
		}
		out[v]++
	}
	return out
}

// ownBundleName reports whether secret name carries own, the caller's own
// trust-domain bundle.
func ownBundleName(name string, own *identity.Bundle) bool {
	switch name {
	case NameRootCA, NameAll:
		return true
	}
	if !strings.HasPrefix(name, "spiffe://") {
		return false
	}
	id, err := spiffeid.FromString(name)
	return err == nil && id.Path() == "" && id.TrustDomain() == own.TrustDomain
}

// ownBundle says whether any of names carries the snapshot's own bundle,
// and its version.
func ownBundle(names []string, snap *identity.Snapshot) (string, bool) {
	if len(snap.Bundles) == 0 {
		return "", false
	}
	own := snap.Bundles[0]
	for _, n := range names {
		if ownBundleName(n, own) {
			return own.Version, true
		}
	}
	return "", false
}
