package boltstore

import (
	"context"
	"errors"
	"reflect"
	"testing"

	"github.com/meshid/meshid/store"
)

// TestUpdateEntry: the entry and its uniqueness claim change together,
// refusals change nothing, and a hint survives a reopen (entry format v2)
// beside entries without one (still v1).
func TestUpdateEntry(t *testing.T) {
	s, path := newStore(t)
	ctx := context.Background()
	a := testEntry("a", "spiffe://cluster.local/web", "unix:uid:1")
	b := testEntry("b", "spiffe://cluster.local/web", "unix:uid:2")
	for _, e := range []store.Entry{a, b} {
		if err := s.CreateEntry(ctx, e, store.AuditEvent{Action: "entry.create"}); err != nil {
			t.Fatal(err)
		}
	}
	newA := testEntry("a", "spiffe://cluster.local/web", "unix:uid:3")
	newA.Hint = "web"
	newA.DNSNames = []string{"web.example"}
	old, err := s.UpdateEntry(ctx, newA, store.AuditEvent{Action: "entry.update"})
	if err != nil || !reflect.DeepEqual(old, a) {
		t.Fatalf("update: %v, old %+v want %+v", err, old, a)
	}
	// a's old claim is gone: its former SPIFFE ID and selectors are free.
	if err := s.CreateEntry(ctx, testEntry("c", "spiffe://cluster.local/web", "unix:uid:1"), store.AuditEvent{Action: "entry.create"}); err != nil {
		t.Fatalf("old selectors still claimed: %v", err)
	}
	entries, audit := counts(t, s)
	if _, err := s.UpdateEntry(ctx, testEntry("b", "spiffe://cluster.local/web", "unix:uid:3"), store.AuditEvent{Action: "entry.update"}); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("update into a duplicate: %v", err)
	}
	if _, err := s.UpdateEntry(ctx, testEntry("missing", "spiffe://cluster.local/x", "unix:uid:9"), store.AuditEvent{Action: "entry.update"}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("update of a missing entry: %v", err)
	}
	if e2, a2 := counts(t, s); e2 != entries || a2 != audit {
		t.Fatalf("refused updates changed the store: %d/%d entries, %d/%d audit", e2, entries, a2, audit)
	}
	if got, _ := s.GetEntry(ctx, "b"); !reflect.DeepEqual(got, b) {
		t.Fatalf("refused update changed b: %+v", got)
	}
	s = reopen(t, s, path)
	if got, err := s.GetEntry(ctx, "a"); err != nil || !reflect.DeepEqual(got, newA) {
		t.Fatalf("after reopen: %+v %v, want %+v", got, err, newA)
	}
	if got, err := s.GetEntry(ctx, "b"); err != nil || !reflect.DeepEqual(got, b) {
		t.Fatalf("v1 entry after reopen: %+v %v", got, err)
	}
}
