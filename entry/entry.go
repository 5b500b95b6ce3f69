// Package entry is what a registration entry is and how callers are matched
// against entries: the Entry and Selector types, parsing, normalising and
// validating them, and the in-memory Index that matches a caller's
// selectors to the entries it is entitled to.
//
// It exists so that everything that handles entries without persisting
// them — the admin CLI parsing --selector, the server, and the node agent
// that will match its local workloads against the entries it is sent —
// shares one definition and one set of rules without importing the store
// or the server. The Index lets a caller be matched on every request
// without touching the store. The package declares what it needs from the
// attestors (Kinds) instead of importing the server's choice of them.
package entry

import "time"

// Selector is one attestable property of a caller, e.g. unix:uid:1000 is
// {Type: "unix", Value: "uid:1000"}.
type Selector struct {
	Type  string
	Value string
}

// Entry is a registration entry: callers whose selectors include all of
// Selectors are entitled to SpiffeID.
type Entry struct {
	ID        string
	SpiffeID  string
	Selectors []Selector // sorted by the caller; the store does not reorder
	TTL       time.Duration
	DNSNames  []string
	CreatedAt time.Time
	// Hint is sent as the Workload API SVID hint; empty means the ID.
	Hint string
	// ParentID, if set, is the SPIFFE ID of the one node agent that may
	// serve the entry; empty means every agent and the server's own
	// workload socket.
	ParentID string
}
