package controlplane

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/store"
)

// InvalidArgumentError marks a request the caller must fix; the admin API
// maps it to codes.InvalidArgument with its message.
type InvalidArgumentError struct{ msg string }

func (e *InvalidArgumentError) Error() string { return e.msg }

// alreadyExistsError is a duplicate with a message for the operator; it
// matches store.ErrAlreadyExists.
type alreadyExistsError struct{ msg string }

func (e *alreadyExistsError) Error() string { return e.msg }
func (e *alreadyExistsError) Unwrap() error { return store.ErrAlreadyExists }

func invalidf(format string, args ...any) error {
	return &InvalidArgumentError{msg: fmt.Sprintf(format, args...)}
}

// parseWorkloadID checks that id is a SPIFFE ID for a workload in the
// server's trust domain: SVIDs for the trust domain itself are not allowed
// (the X509-SVID standard requires a non-root path).
func (s *Server) parseWorkloadID(id string) (spiffeid.ID, error) {
	if id == "" {
		return spiffeid.ID{}, invalidf("spiffe id is required")
	}
	// Before parsing, so a huge ID is neither parsed nor echoed back whole.
	if err := ca.CheckSPIFFEID(id); err != nil {
		return spiffeid.ID{}, invalidf("spiffe id %.64q...: %v", id, err)
	}
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return spiffeid.ID{}, invalidf("invalid spiffe id %q: %v", id, err)
	}
	if sid.TrustDomain() != s.td {
		return spiffeid.ID{}, invalidf("spiffe id %s is not in trust domain %s", id, s.td)
	}
	if sid.Path() == "" {
		return spiffeid.ID{}, invalidf("spiffe id %s has no path; workload IDs look like spiffe://%s/ns/<namespace>/sa/<serviceaccount>", id, s.td)
	}
	return sid, nil
}

// validateDNSNames is entry.ValidateDNSNames as an InvalidArgument, for
// mints and entries alike.
func validateDNSNames(names []string) error {
	if err := entry.ValidateDNSNames(names); err != nil {
		return invalidf("%v", err)
	}
	return nil
}

// validateX509TTL checks an explicitly requested X.509-SVID lifetime.
func (s *Server) validateX509TTL(ttl time.Duration) error {
	a, _ := s.activeCA()
	if err := ca.CheckTTL(ttl, ca.MinX509SVIDTTL, a.RemainingLife(s.now())); err != nil {
		return invalidf("%v", err)
	}
	return nil
}

// validateEntry is the one check of a registration entry, for creation and
// update alike; it normalizes the selectors in place.
func (s *Server) validateEntry(e *store.Entry) error {
	if _, err := s.parseWorkloadID(e.SpiffeID); err != nil {
		return err
	}
	if err := s.checkNotReserved(e.SpiffeID); err != nil {
		return err
	}
	if err := entry.Validate(e, attestors, s.validateX509TTL); err != nil {
		return &InvalidArgumentError{msg: err.Error()}
	}
	return s.validateParentID(e.ParentID)
}

// validateParentID checks an entry's parent: empty, or the SPIFFE ID of a
// node agent of this trust domain. Anything else would be an entry no
// agent is ever served, which is a typo rather than an intent.
func (s *Server) validateParentID(parent string) error {
	if parent == "" {
		return nil
	}
	if err := ca.CheckSPIFFEID(parent); err != nil {
		return invalidf("parent id %.64q...: %v", parent, err)
	}
	id, err := spiffeid.FromString(parent)
	if err != nil {
		return invalidf("invalid parent id %q: %v", parent, err)
	}
	if !s.isAgentID(id) {
		return invalidf("parent id %s is not a node agent: use spiffe://%s%s<method>/<node>, e.g. spiffe://%s%sjoin/web-1", parent, s.td, agentPath, s.td, agentPath)
	}
	return nil
}

// EntrySpec is what an operator asks to register.
type EntrySpec struct {
	SpiffeID  string
	Selectors []store.Selector
	TTL       time.Duration
	DNSNames  []string
	// Hint is the Workload API hint; empty means the entry ID.
	Hint string
	// ParentID, if set, is the node agent that alone may serve the entry.
	ParentID string
}

// CreateEntry validates and stores a registration entry. Validation errors
// are *InvalidArgumentError; a duplicate is store.ErrAlreadyExists.
func (s *Server) CreateEntry(ctx context.Context, spec EntrySpec, actor string) (store.Entry, error) {
	e := store.Entry{
		ID:        newID(),
		SpiffeID:  spec.SpiffeID,
		Selectors: spec.Selectors,
		TTL:       spec.TTL,
		DNSNames:  spec.DNSNames,
		Hint:      spec.Hint,
		ParentID:  spec.ParentID,
		CreatedAt: s.now(),
	}
	if err := s.validateEntry(&e); err != nil {
		return store.Entry{}, err
	}
	err := s.store.CreateEntry(ctx, e, store.AuditEvent{
		Time: e.CreatedAt, Actor: actor, Action: "entry.create", Target: e.ID,
		Detail: fmt.Sprintf("%s selectors=%v%s", e.SpiffeID, selectorStrings(e.Selectors), parentDetail(e.ParentID)),
	})
	if err != nil {
		if errors.Is(err, store.ErrAlreadyExists) {
			return store.Entry{}, duplicateEntry(e)
		}
		return store.Entry{}, fmt.Errorf("create entry: %w", err)
	}
	// The projection indexes it and serves it to callers it matches.
	if err := s.synced(ctx); err != nil {
		return store.Entry{}, err
	}
	s.log.Info("entry created", "id", e.ID, "spiffe_id", e.SpiffeID, "actor", actor)
	return e, nil
}

// DeleteEntry removes an entry. A missing entry is store.ErrNotFound.
//
// Deleting an entry is also a revocation: its SVIDs stop being renewed and
// every live serial issued for it goes on the CRL, so the identity dies now,
// not at its next expiry.
func (s *Server) DeleteEntry(ctx context.Context, id, actor string) (store.Entry, []store.RevokedSerial, error) {
	if err := s.checkCRLRoom(ctx, func(r store.IssuedSVID) bool { return id != "" && r.EntryID == id }); err != nil {
		return store.Entry{}, nil, err
	}
	e, err := s.deleteEntry(ctx, id, actor)
	if err != nil {
		return e, nil, err
	}
	revoked, err := s.revokeRows(ctx, func(r store.IssuedSVID) bool { return r.EntryID == id }, "entry "+id, actor, 1)
	if err != nil {
		return e, nil, fmt.Errorf("entry %s deleted, but revoking its certificates failed: %w", id, err)
	}
	return e, revoked, nil
}

// deleteEntry removes an entry without touching its certificates.
func (s *Server) deleteEntry(ctx context.Context, id, actor string) (store.Entry, error) {
	if id == "" {
		return store.Entry{}, invalidf("entry id is required")
	}
	s.entries.updateMu.Lock()
	defer s.entries.updateMu.Unlock()
	// The SPIFFE ID in the audit event is also the record that its
	// JWT-SVIDs issued until now are refused (jwtrevoke.go).
	ev := store.AuditEvent{Time: s.now(), Actor: actor, Action: "entry.delete", Target: id, Detail: s.entrySpiffeID(id)}
	e, err := s.store.DeleteEntry(ctx, id, ev)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return store.Entry{}, fmt.Errorf("entry %s: %w", id, err)
		}
		return store.Entry{}, fmt.Errorf("delete entry %s: %w", id, err)
	}
	// The projection drops it, stops its renewals and refuses its
	// JWT-SVIDs.
	s.revokeJWTs(e.SpiffeID, ev.Time)
	if err := s.synced(ctx); err != nil {
		return store.Entry{}, err
	}
	s.log.Info("entry deleted", "id", id, "spiffe_id", e.SpiffeID, "actor", actor)
	return e, nil
}

// ListEntries pages through the registration entries.
func (s *Server) ListEntries(ctx context.Context, q store.EntryQuery) ([]store.Entry, string, error) {
	return s.store.ListEntries(ctx, q)
}

// MatchEntries returns the entries whose selectors the caller all has.
func (s *Server) MatchEntries(callerSelectors []string) []store.Entry {
	return s.entries.match(callerSelectors)
}

// duplicateEntry is the operator's message for an entry whose SPIFFE ID,
// selectors and parent another entry already has (SPIRE's rule: the same
// pair under two different parents is two entries).
func duplicateEntry(e store.Entry) error {
	msg := fmt.Sprintf("an entry for %s with selectors %v", e.SpiffeID, selectorStrings(e.Selectors))
	if e.ParentID != "" {
		msg += " and parent " + e.ParentID
	}
	return &alreadyExistsError{msg: msg + " already exists"}
}

func parentDetail(parent string) string {
	if parent == "" {
		return ""
	}
	return " parent=" + parent
}

func selectorStrings(sels []store.Selector) []string { return entry.Strings(sels) }

// newID returns a random UUIDv4, the form SPIRE users already know.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
