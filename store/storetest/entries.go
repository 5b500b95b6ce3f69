package storetest

import (
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func testEntries(t *testing.T, s store.Store) {
	e1 := entry("e1", "spiffe://example.org/a", "unix:uid:1", "unix:gid:2")
	e1.DNSNames = []string{"a.example.org"}
	e1.Hint = "front"
	must(t, s.CreateEntry(bg, e1, auditFor("entry.create", "e1")))
	got, err := s.GetEntry(bg, "e1")
	must(t, err)
	if !reflect.DeepEqual(got, e1) {
		t.Fatalf("GetEntry = %+v, want %+v", got, e1)
	}
	_, err = s.GetEntry(bg, "nope")
	wantErr(t, "GetEntry missing", err, store.ErrNotFound)

	unchanged(t, s, "CreateEntry same id", store.ErrAlreadyExists, func() error {
		return s.CreateEntry(bg, entry("e1", "spiffe://example.org/other"), nop)
	})
	unchanged(t, s, "CreateEntry same spiffe id and selectors", store.ErrAlreadyExists, func() error {
		return s.CreateEntry(bg, entry("e2", "spiffe://example.org/a", "unix:uid:1", "unix:gid:2"), nop)
	})
	unchanged(t, s, "CreateEntry empty id", store.ErrInvalid, func() error {
		return s.CreateEntry(bg, entry("", "spiffe://example.org/x"), nop)
	})
	unchanged(t, s, "CreateEntry empty spiffe id", store.ErrInvalid, func() error {
		return s.CreateEntry(bg, entry("e3", ""), nop)
	})
	// Same SPIFFE ID, different selectors: a distinct entry.
	must(t, s.CreateEntry(bg, entry("e2", "spiffe://example.org/a", "unix:uid:1"), nop))

	unchanged(t, s, "DeleteEntry missing", store.ErrNotFound, func() error {
		_, err := s.DeleteEntry(bg, "nope", nop)
		return err
	})
	old, err := s.DeleteEntry(bg, "e1", auditFor("entry.delete", "e1"))
	must(t, err)
	if !reflect.DeepEqual(old, e1) {
		t.Fatalf("DeleteEntry returned %+v, want %+v", old, e1)
	}
	_, err = s.GetEntry(bg, "e1")
	wantErr(t, "GetEntry deleted", err, store.ErrNotFound)
	// The deleted entry's uniqueness claim went with it.
	must(t, s.CreateEntry(bg, entry("e1b", "spiffe://example.org/a", "unix:uid:1", "unix:gid:2"), nop))
	ev, err := s.ListAudit(bg, 0)
	must(t, err)
	var actions []string
	for _, e := range ev {
		actions = append(actions, e.Action+" "+e.Target)
	}
	if !slices.Contains(actions, "entry.create e1") || !slices.Contains(actions, "entry.delete e1") {
		t.Fatalf("audit %v lacks the create and delete of e1", actions)
	}
	testEntryParents(t, s)
}

// testEntryParents checks SPIRE's uniqueness rule: parent, SPIFFE ID and
// selectors together identify an entry, so the same pair may be registered
// once without a parent and once under each agent.
func testEntryParents(t *testing.T, s store.Store) {
	const (
		web1 = "spiffe://example.org/meshid/agent/join/web-1"
		web2 = "spiffe://example.org/meshid/agent/join/web-2"
	)
	parented := func(id, parent string) store.Entry {
		e := entry(id, "spiffe://example.org/p", "unix:uid:7")
		e.ParentID = parent
		return e
	}
	must(t, s.CreateEntry(bg, parented("p0", ""), nop))
	p1 := parented("p1", web1)
	must(t, s.CreateEntry(bg, p1, nop))
	must(t, s.CreateEntry(bg, parented("p2", web2), nop))
	got, err := s.GetEntry(bg, "p1")
	must(t, err)
	if !reflect.DeepEqual(got, p1) {
		t.Fatalf("GetEntry = %+v, want %+v", got, p1)
	}
	unchanged(t, s, "CreateEntry same spiffe id, selectors and parent", store.ErrAlreadyExists, func() error {
		return s.CreateEntry(bg, parented("p3", web1), nop)
	})
	unchanged(t, s, "UpdateEntry onto another parent's claim", store.ErrAlreadyExists, func() error {
		_, err := s.UpdateEntry(bg, parented("p2", web1), nop)
		return err
	})
	unchanged(t, s, "UpdateEntry dropping the parent onto a parentless claim", store.ErrAlreadyExists, func() error {
		_, err := s.UpdateEntry(bg, parented("p2", ""), nop)
		return err
	})
	// Moving p0 under an agent frees the parentless claim, and deleting p1
	// frees web-1's.
	_, err = s.UpdateEntry(bg, parented("p0", "spiffe://example.org/meshid/agent/join/web-3"), nop)
	must(t, err)
	_, err = s.DeleteEntry(bg, "p1", nop)
	must(t, err)
	must(t, s.CreateEntry(bg, parented("p4", ""), nop))
	must(t, s.CreateEntry(bg, parented("p5", web1), nop))
}

func testEntryUpdate(t *testing.T, s store.Store) {
	a := entry("a", "spiffe://example.org/a", "unix:uid:1")
	b := entry("b", "spiffe://example.org/b", "unix:uid:2")
	must(t, s.CreateEntry(bg, a, nop))
	must(t, s.CreateEntry(bg, b, nop))
	unchanged(t, s, "UpdateEntry missing", store.ErrNotFound, func() error {
		_, err := s.UpdateEntry(bg, entry("c", "spiffe://example.org/c"), nop)
		return err
	})
	unchanged(t, s, "UpdateEntry onto another entry's identity", store.ErrAlreadyExists, func() error {
		_, err := s.UpdateEntry(bg, entry("a", "spiffe://example.org/b", "unix:uid:2"), nop)
		return err
	})
	unchanged(t, s, "UpdateEntry empty spiffe id", store.ErrInvalid, func() error {
		_, err := s.UpdateEntry(bg, entry("a", ""), nop)
		return err
	})
	a2 := entry("a", "spiffe://example.org/a2", "unix:uid:1")
	a2.TTL = 5 * time.Minute
	old, err := s.UpdateEntry(bg, a2, auditFor("entry.update", "a"))
	must(t, err)
	if !reflect.DeepEqual(old, a) {
		t.Fatalf("UpdateEntry returned %+v, want the old %+v", old, a)
	}
	got, _ := s.GetEntry(bg, "a")
	if !reflect.DeepEqual(got, a2) {
		t.Fatalf("after update GetEntry = %+v, want %+v", got, a2)
	}
	// Updating an entry to what it already is conflicts with nothing.
	_, err = s.UpdateEntry(bg, a2, nop)
	must(t, err)
	// The old identity is free again, the new one is taken.
	must(t, s.CreateEntry(bg, entry("a-old", "spiffe://example.org/a", "unix:uid:1"), nop))
	wantErr(t, "CreateEntry on updated identity", s.CreateEntry(bg, entry("x", "spiffe://example.org/a2", "unix:uid:1"), nop), store.ErrAlreadyExists)
}

func testEntryPaging(t *testing.T, s store.Store) {
	var want []string
	for i := range 23 {
		id := fmt.Sprintf("e%03d", (i*7)%23) // created out of order
		must(t, s.CreateEntry(bg, entry(id, "spiffe://example.org/"+id), nop))
		want = append(want, id)
	}
	slices.Sort(want)
	all, next, err := s.ListEntries(bg, store.EntryQuery{})
	must(t, err)
	if next != "" || len(all) != 23 {
		t.Fatalf("unpaged list: %d entries, next %q", len(all), next)
	}
	for _, size := range []int{1, 5, 23, 100} {
		var got []string
		tok := ""
		for pages := 0; ; pages++ {
			if pages > 30 {
				t.Fatalf("page size %d: no end after %d pages", size, pages)
			}
			es, next, err := s.ListEntries(bg, store.EntryQuery{PageSize: size, PageToken: tok})
			must(t, err)
			if len(es) > size {
				t.Fatalf("page size %d: got %d", size, len(es))
			}
			for _, e := range es {
				got = append(got, e.ID)
			}
			if next == "" {
				break
			}
			tok = next
		}
		if !slices.Equal(got, want) {
			t.Fatalf("page size %d: ids %v, want %v", size, got, want)
		}
	}
	_, _, err = s.ListEntries(bg, store.EntryQuery{PageSize: -1})
	wantErr(t, "ListEntries negative page size", err, store.ErrInvalid)
}
