package workload

import (
	"sync"
	"sync/atomic"

	"github.com/meshid/meshid/identity"
)

// Which bundle each X.509 watcher holds, for the convergence gate of CA
// activation (see sds.Server.BundleVersions). The Workload API has no
// ACK: a watcher holds what it was last sent. FetchX509SVID and
// FetchX509Bundles watchers count; JWT bundle watchers do not (the gate is
// about X.509 CAs).

type watcher struct{ held atomic.Pointer[string] }

type watchers struct {
	mu sync.Mutex
	m  map[*watcher]struct{}
}

// track registers a watcher of rpc; nil for one that does not count.
func (s *Server) track(rpc string) *watcher {
	if rpc != "FetchX509SVID" && rpc != "FetchX509Bundles" {
		return nil
	}
	w := &watcher{}
	s.watchers.mu.Lock()
	defer s.watchers.mu.Unlock()
	if s.watchers.m == nil {
		s.watchers.m = map[*watcher]struct{}{}
	}
	s.watchers.m[w] = struct{}{}
	return w
}

func (s *Server) untrack(w *watcher) {
	if w == nil {
		return
	}
	s.watchers.mu.Lock()
	defer s.watchers.mu.Unlock()
	delete(s.watchers.m, w)
}

// sent records that w was sent a response built from snap.
func (w *watcher) sent(snap *identity.Snapshot) {
	if w == nil {
		return
	}
	v := ""
	if len(snap.Bundles) > 0 {
		v = snap.Bundles[0].Version
	}
	w.held.Store(&v)
}

// BundleVersions counts, at call time, the open X.509 watchers by the
// version of the caller's own trust bundle in the last response each was
// sent; the key "" counts those sent nothing yet.
func (s *Server) BundleVersions() map[string]int {
	out := map[string]int{}
	s.watchers.mu.Lock()
	defer s.watchers.mu.Unlock()
	for w := range s.watchers.m {
		v := ""
		if p := w.held.Load(); p != nil {
			v = *p
		}
		out[v]++
	}
	return out
}
