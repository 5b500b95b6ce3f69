package controlplane

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/meshid/meshid/store"
)

// EntryUpdate names the fields of an entry to change; nil leaves a field as
// it is.
type EntryUpdate struct {
	Selectors []store.Selector // replaced when non-empty
	DNSNames  *[]string
	TTL       *time.Duration // zero: the server default
	Hint      *string
	// ParentID replaces the parent when set; "" removes it.
	ParentID *string
}

// GetEntry returns one entry; a missing one is store.ErrNotFound.
func (s *Server) GetEntry(ctx context.Context, id string) (store.Entry, error) {
	if id == "" {
		return store.Entry{}, invalidf("entry id is required")
	}
	e, err := s.store.GetEntry(ctx, id)
	if err != nil {
		return store.Entry{}, fmt.Errorf("get entry %s: %w", id, err)
	}
	return e, nil
}

// UpdateEntry changes an entry, validated exactly as CreateEntry validates
// a new one; a refused update changes nothing. Callers holding the entry
// are re-matched and its SVID re-issued, so the change is served at once.
func (s *Server) UpdateEntry(ctx context.Context, id string, u EntryUpdate, actor string) (store.Entry, error) {
	if id == "" {
		return store.Entry{}, invalidf("entry id is required")
	}
	if len(u.Selectors) == 0 && u.DNSNames == nil && u.TTL == nil && u.Hint == nil && u.ParentID == nil {
		return store.Entry{}, invalidf("nothing to update: give selectors, dns names, a ttl, a hint or a parent id")
	}
	// Serialized with every other update so that two concurrent updates of
	// one entry cannot each start from the same old version.
	s.entries.updateMu.Lock()
	defer s.entries.updateMu.Unlock()
	e, err := s.store.GetEntry(ctx, id)
	if err != nil {
		return store.Entry{}, fmt.Errorf("update entry %s: %w", id, err)
	}
	if len(u.Selectors) > 0 {
		e.Selectors = u.Selectors
	}
	if u.DNSNames != nil {
		e.DNSNames = *u.DNSNames
	}
	if u.TTL != nil {
		e.TTL = *u.TTL
	}
	if u.Hint != nil {
		e.Hint = *u.Hint
	}
	if u.ParentID != nil {
		e.ParentID = *u.ParentID
	}
	if err := s.validateEntry(&e); err != nil {
		return store.Entry{}, err
	}
	if len(e.DNSNames) == 0 {
		e.DNSNames = nil
	}
	_, err = s.store.UpdateEntry(ctx, e, store.AuditEvent{
		Time: s.now(), Actor: actor, Action: "entry.update", Target: e.ID,
		Detail: fmt.Sprintf("%s selectors=%v dns=%v ttl=%s hint=%q parent=%q", e.SpiffeID, selectorStrings(e.Selectors), e.DNSNames, e.TTL, e.Hint, e.ParentID),
	})
	if err != nil {
		if errors.Is(err, store.ErrAlreadyExists) {
			return store.Entry{}, duplicateEntry(e)
		}
		return store.Entry{}, fmt.Errorf("update entry %s: %w", id, err)
	}

	// The projection re-indexes it, re-issues its SVIDs and re-matches
	// the callers.
	if err := s.synced(ctx); err != nil {
		return store.Entry{}, err
	}
	s.log.Info("entry updated", "id", e.ID, "spiffe_id", e.SpiffeID, "actor", actor)
	return e, nil
}
