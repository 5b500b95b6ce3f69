package entry

import (
	"cmp"
	"slices"
	"sync"
)

// Index is an in-memory view of registration entries that matches a
// caller's selectors to entries without touching the store on every
// request. It is safe for concurrent use. Keeping it in step with the
// store (and ordering updates against it) is the owner's job.
type Index struct {
	mu         sync.RWMutex
	byID       map[string]Entry
	bySelector map[string]map[string]struct{} // selector string -> entry IDs
}

// NewIndex returns an empty index.
func NewIndex() *Index {
	return &Index{byID: map[string]Entry{}, bySelector: map[string]map[string]struct{}{}}
}

// Put adds e, replacing the entry with the same ID if there is one: the
// old version's selectors stop matching.
func (x *Index) Put(e Entry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removeLocked(e.ID)
	x.byID[e.ID] = e
	for _, s := range e.Selectors {
		k := s.String()
		ids := x.bySelector[k]
		if ids == nil {
			ids = map[string]struct{}{}
			x.bySelector[k] = ids
		}
		ids[e.ID] = struct{}{}
	}
}

// Remove drops the entry with this ID; a missing ID is not an error.
func (x *Index) Remove(id string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.removeLocked(id)
}

func (x *Index) removeLocked(id string) {
	e, ok := x.byID[id]
	if !ok {
		return
	}
	delete(x.byID, id)
	for _, s := range e.Selectors {
		k := s.String()
		ids := x.bySelector[k]
		delete(ids, id)
		if len(ids) == 0 {
			delete(x.bySelector, k)
		}
	}
}

// Get returns the entry with this ID.
func (x *Index) Get(id string) (Entry, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	e, ok := x.byID[id]
	return e, ok
}

// IDs lists the IDs of the indexed entries, in no order.
func (x *Index) IDs() []string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	out := make([]string, 0, len(x.byID))
	for id := range x.byID {
		out = append(out, id)
	}
	return out
}

// Len is the number of entries.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.byID)
}

// BySpiffeID returns the entries granting spiffeID, ordered by ID.
func (x *Index) BySpiffeID(spiffeID string) []Entry {
	x.mu.RLock()
	var out []Entry
	for _, e := range x.byID {
		if e.SpiffeID == spiffeID {
			out = append(out, e)
		}
	}
	x.mu.RUnlock()
	slices.SortFunc(out, func(a, b Entry) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Match returns the entries all of whose selectors are among
// callerSelectors (each type:key:value, as Selector.String renders them),
// ordered by SPIFFE ID then ID: the first is the caller's default SVID.
func (x *Index) Match(callerSelectors []string) []Entry {
	have := make(map[string]bool, len(callerSelectors))
	for _, s := range callerSelectors {
		have[s] = true
	}
	x.mu.RLock()
	seen := map[string]bool{}
	var out []Entry
	for _, s := range callerSelectors {
		for id := range x.bySelector[s] {
			if seen[id] {
				continue
			}
			seen[id] = true
			e := x.byID[id]
			all := true
			for _, es := range e.Selectors {
				if !have[es.String()] {
					all = false
					break
				}
			}
			if all {
				out = append(out, e)
			}
		}
	}
	x.mu.RUnlock()
	slices.SortFunc(out, func(a, b Entry) int {
		return cmp.Or(cmp.Compare(a.SpiffeID, b.SpiffeID), cmp.Compare(a.ID, b.ID))
	})
	return out
}
