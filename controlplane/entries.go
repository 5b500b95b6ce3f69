package controlplane

import (
	"cmp"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/store"
)

// entryIndex is the in-memory view of registration entries used to match a
// caller's selectors without touching the store on every request.
type entryIndex struct {
	// updateMu orders entry updates and deletions (store, then index), so
	// the index never keeps a version the store no longer has.
	updateMu   sync.Mutex
	mu         sync.RWMutex
	byID       map[string]store.Entry
	bySelector map[string][]string // selector string -> entry IDs
}

func newEntryIndex() *entryIndex {
	return &entryIndex{byID: map[string]store.Entry{}, bySelector: map[string][]string{}}
}

func (x *entryIndex) put(e store.Entry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.byID[e.ID] = e
	for _, s := range e.Selectors {
		k := SelectorString(s)
		x.bySelector[k] = append(x.bySelector[k], e.ID)
	}
}

func (x *entryIndex) remove(id string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	e, ok := x.byID[id]
	if !ok {
		return
	}
	delete(x.byID, id)
	for _, s := range e.Selectors {
		k := SelectorString(s)
		ids := x.bySelector[k]
		for i, other := range ids {
			if other == id {
				ids = append(ids[:i], ids[i+1:]...)
				break
			}
		}
		if len(ids) == 0 {
			delete(x.bySelector, k)
		} else {
			x.bySelector[k] = ids
		}
	}
}

func (x *entryIndex) get(id string) (store.Entry, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	e, ok := x.byID[id]
	return e, ok
}

func (x *entryIndex) len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.byID)
}

// match returns the entries all of whose selectors the caller has.
func (x *entryIndex) match(callerSelectors []string) []store.Entry {
	have := make(map[string]bool, len(callerSelectors))
	for _, s := range callerSelectors {
		have[s] = true
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	seen := map[string]bool{}
	var out []store.Entry
	for _, s := range callerSelectors {
		for _, id := range x.bySelector[s] {
			if seen[id] {
				continue
			}
			seen[id] = true
			e := x.byID[id]
			all := true
			for _, es := range e.Selectors {
				if !have[SelectorString(es)] {
					all = false
					break
				}
			}
			if all {
				out = append(out, e)
			}
		}
	}
	// Deterministic order: the first match is the caller's "default" SVID.
	slices.SortFunc(out, func(a, b store.Entry) int {
		return cmp.Or(cmp.Compare(a.SpiffeID, b.SpiffeID), cmp.Compare(a.ID, b.ID))
	})
	return out
}

// reservedPath is the path prefix meshid keeps for its own identities (its
// serving certificate today, its node agents later): no entry or token may
// grant one, or a workload could pose as the server to remote callers.
const reservedPath = "/meshid/"

// checkNotReserved refuses a SPIFFE ID under the reserved path prefix.
func (s *Server) checkNotReserved(spiffeID string) error {
	id, err := spiffeid.FromString(spiffeID)
	if err != nil {
		return invalidf("invalid spiffe id %q: %v", spiffeID, err)
	}
	if id.TrustDomain() == s.td && (id.Path() == strings.TrimSuffix(reservedPath, "/") || strings.HasPrefix(id.Path(), reservedPath)) {
		return invalidf("spiffe id %s is reserved: meshid keeps spiffe://%s%s for its own identities", spiffeID, s.td, reservedPath)
	}
	return nil
}

// entryHint is the Workload API hint for an entry's SVIDs: the operator's
// --hint, else the entry ID as before hints existed.
func entryHint(e store.Entry) string {
	if e.Hint != "" {
		return e.Hint
	}
	return e.ID
}

// ids lists the IDs of the indexed entries.
func (x *entryIndex) ids() []string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make([]string, 0, len(x.byID))
	for id := range x.byID {
		out = append(out, id)
	}
	return out
}
