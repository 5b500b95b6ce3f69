package controlplane

import (
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/store"
)

// entryIndex is the server's entry.Index and the lock that orders writes
// to it.
type entryIndex struct {
	// updateMu orders entry updates and deletions (store, then index), so
	// the index never keeps a version the store no longer has.
	updateMu sync.Mutex
	idx      *entry.Index
}

func newEntryIndex() *entryIndex { return &entryIndex{idx: entry.NewIndex()} }

func (x *entryIndex) put(e store.Entry)                  { x.idx.Put(e) }
func (x *entryIndex) remove(id string)                   { x.idx.Remove(id) }
func (x *entryIndex) get(id string) (store.Entry, bool)  { return x.idx.Get(id) }
func (x *entryIndex) len() int                           { return x.idx.Len() }
func (x *entryIndex) bySpiffeID(id string) []store.Entry { return x.idx.BySpiffeID(id) }
func (x *entryIndex) match(callerSelectors []string) []store.Entry {
	return x.idx.Match(callerSelectors)
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
func (x *entryIndex) ids() []string { return x.idx.IDs() }
