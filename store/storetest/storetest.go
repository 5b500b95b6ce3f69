// Package storetest is the conformance suite every store.Store backend must
// pass: each method's contract, the sentinel errors, "a call that returns an
// error has changed nothing", concurrent writers, Watch ordering, resume and
// compaction, leadership and pagination. It uses nothing but the store.Store
// interface (and the optional Compacter), so bbolt and etcd run the same
// tests:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store { return openEmpty(t) })
//	}
package storetest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// Compacter is implemented by a backend that can drop retained watch
// history on demand. The suite uses it to test ErrCompacted without writing
// past the backend's retention; without it those tests rely on the
// backend's own bound and are skipped if that is never reached.
type Compacter interface {
	// Compact drops the watch history up to and including rev.
	Compact(ctx context.Context, rev int64) error
}

// Run runs the suite. newStore returns a new, empty store for one subtest;
// the suite closes it (backends must allow Close to be called twice, so
// the factory may also close it in a Cleanup).
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(*testing.T, store.Store)
	}{
		{"CAs", testCAs},
		{"Entries", testEntries},
		{"EntryUpdate", testEntryUpdate},
		{"EntryPaging", testEntryPaging},
		{"SVIDs", testSVIDs},
		{"SVIDPaging", testSVIDPaging},
		{"Audit", testAudit},
		{"Tokens", testTokens},
		{"TokenSingleUseRace", testTokenSingleUseRace},
		{"Revocations", testRevocations},
		{"CRLNumbers", testCRLNumbers},
		{"CancelledContext", testCancelledContext},
		{"ConcurrentWriters", testConcurrentWriters},
		{"WatchOrder", testWatchOrder},
		{"WatchResume", testWatchResume},
		{"WatchCompacted", testWatchCompacted},
		{"WatchSlowConsumer", testWatchSlowConsumer},
		{"WatchEnds", testWatchEnds},
		{"Leadership", testLeadership},
		{"Closed", testClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			t.Cleanup(func() { _ = s.Close() })
			tc.fn(t, s)
		})
	}
}

var (
	t0  = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	bg  = context.Background()
	nop = store.AuditEvent{Time: t0, Actor: "storetest", Action: "test"}
)

func auditFor(action, target string) store.AuditEvent {
	return store.AuditEvent{Time: t0, Actor: "storetest", Action: action, Target: target}
}

func entry(id, spiffeID string, sels ...string) store.Entry {
	e := store.Entry{ID: id, SpiffeID: spiffeID, TTL: time.Hour, CreatedAt: t0}
	for _, s := range sels {
		typ, val, _ := strings.Cut(s, ":")
		e.Selectors = append(e.Selectors, store.Selector{Type: typ, Value: val})
	}
	return e
}

func svid(i int, notAfter time.Time) store.IssuedSVID {
	return store.IssuedSVID{
		Serial:    fmt.Sprintf("%032x", i),
		SpiffeID:  fmt.Sprintf("spiffe://example.org/w%d", i%7),
		NotBefore: notAfter.Add(-time.Hour),
		NotAfter:  notAfter,
		EntryID:   "e1",
		Requester: "unix:uid:1000",
		CAID:      "ca-1",
		IssuedAt:  notAfter.Add(-time.Hour),
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: err = %v, want %v", what, err, target)
	}
}

// state is everything observable through the read methods except tokens
// (which can only be read by redeeming them).
type state struct {
	CAs     []store.CARecord
	Entries []store.Entry
	SVIDs   []store.IssuedSVID
	Audit   []store.AuditEvent
	Revoked []store.RevokedSerial
	Rev     int64
}

func snapshot(t *testing.T, s store.Store) state {
	t.Helper()
	var st state
	var err error
	if st.CAs, err = s.ListCAs(bg); err != nil {
		t.Fatal(err)
	}
	if st.Entries, _, err = s.ListEntries(bg, store.EntryQuery{}); err != nil {
		t.Fatal(err)
	}
	if st.SVIDs, _, err = s.ListSVIDs(bg, store.SVIDQuery{}); err != nil {
		t.Fatal(err)
	}
	if st.Audit, err = s.ListAudit(bg, 0); err != nil {
		t.Fatal(err)
	}
	if st.Revoked, err = s.ListRevoked(bg); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(st.Revoked, func(a, b store.RevokedSerial) int { return strings.Compare(a.Serial, b.Serial) })
	if st.Rev, err = s.Revision(bg); err != nil {
		t.Fatal(err)
	}
	return st
}

// unchanged runs a call that must fail with target and checks that the
// store looks exactly as before it.
func unchanged(t *testing.T, s store.Store, what string, target error, call func() error) {
	t.Helper()
	before := snapshot(t, s)
	wantErr(t, what, call(), target)
	if after := snapshot(t, s); !reflect.DeepEqual(before, after) {
		t.Fatalf("%s failed but changed the store:\nbefore %+v\nafter  %+v", what, before, after)
	}
}

func testCAs(t *testing.T, s store.Store) {
	a := store.CARecord{ID: "ca-b", Kind: "x509", State: store.CAPrepared, CertDER: []byte{1, 2}, ChainDER: [][]byte{{3}},
		SealedKey: []byte("k"), NotBefore: t0, NotAfter: t0.Add(time.Hour), CreatedAt: t0}
	b := store.CARecord{ID: "ca-a", Kind: "x509", State: store.CAActive, CertDER: []byte{4}, SealedKey: []byte("k"), CreatedAt: t0}
	j := store.CARecord{ID: "jwt-1", Kind: "jwt", State: store.CAActive, PublicKey: []byte("pkix"), SealedKey: []byte("k"), CreatedAt: t0.Add(-time.Minute)}
	must(t, s.PutCA(bg, a, nil))
	a2 := auditFor("ca.prepare", "ca-a")
	must(t, s.PutCA(bg, b, &a2))
	must(t, s.PutCA(bg, j, nil))
	got, err := s.ListCAs(bg)
	must(t, err)
	// Oldest CreatedAt first, ties by ID.
	if want := []store.CARecord{j, b, a}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListCAs = %+v, want %+v", got, want)
	}
	a.State = store.CAActive
	must(t, s.PutCA(bg, a, nil))
	got, _ = s.ListCAs(bg)
	if len(got) != 3 || got[2].State != store.CAActive {
		t.Fatalf("PutCA did not replace: %+v", got)
	}
	if ev, _ := s.ListAudit(bg, 0); len(ev) != 1 || ev[0].Action != "ca.prepare" {
		t.Fatalf("audit = %+v, want only the ca.prepare event", ev)
	}
	unchanged(t, s, "PutCA empty id", store.ErrInvalid, func() error {
		return s.PutCA(bg, store.CARecord{Kind: "x509"}, &a2)
	})
}

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

func testSVIDs(t *testing.T, s store.Store) {
	rows := []store.IssuedSVID{svid(3, t0.Add(3*time.Hour)), svid(1, t0.Add(time.Hour)), svid(2, t0.Add(time.Hour)), svid(4, t0.Add(4*time.Hour))}
	rows[1].EntryID = "" // an admin mint
	for _, r := range rows {
		must(t, s.RecordSVID(bg, r))
	}
	unchanged(t, s, "RecordSVID duplicate serial", store.ErrAlreadyExists, func() error {
		return s.RecordSVID(bg, svid(3, t0.Add(9*time.Hour)))
	})
	unchanged(t, s, "RecordSVID empty serial", store.ErrInvalid, func() error {
		r := svid(5, t0)
		r.Serial = ""
		return s.RecordSVID(bg, r)
	})
	unchanged(t, s, "RecordSVID no NotAfter", store.ErrInvalid, func() error {
		return s.RecordSVID(bg, svid(6, time.Time{}))
	})
	got, next, err := s.ListSVIDs(bg, store.SVIDQuery{})
	must(t, err)
	// By NotAfter, then serial.
	if want := []store.IssuedSVID{rows[1], rows[2], rows[0], rows[3]}; next != "" || !reflect.DeepEqual(got, want) {
		t.Fatalf("ListSVIDs = %+v (next %q), want %+v", got, next, want)
	}
	got, _, err = s.ListSVIDs(bg, store.SVIDQuery{NotExpiredAt: t0.Add(time.Hour), ExpiringBefore: t0.Add(3 * time.Hour)})
	must(t, err)
	if len(got) != 1 || got[0].Serial != rows[0].Serial {
		t.Fatalf("window (1h, 3h] = %+v, want only serial %s", got, rows[0].Serial)
	}
	n, err := s.PruneSVIDs(bg, t0.Add(3*time.Hour))
	must(t, err)
	if n != 2 {
		t.Fatalf("PruneSVIDs = %d, want 2 (NotAfter 1h twice; 3h is not before the cutoff)", n)
	}
	got, _, _ = s.ListSVIDs(bg, store.SVIDQuery{})
	if len(got) != 2 || got[0].Serial != rows[0].Serial || got[1].Serial != rows[3].Serial {
		t.Fatalf("after prune: %+v", got)
	}
	// A pruned serial is gone, so it can be recorded again.
	must(t, s.RecordSVID(bg, rows[1]))
}

func testSVIDPaging(t *testing.T, s store.Store) {
	const n = 41
	for i := range n {
		must(t, s.RecordSVID(bg, svid(i, t0.Add(time.Duration(i%9)*time.Minute))))
	}
	all, _, err := s.ListSVIDs(bg, store.SVIDQuery{})
	must(t, err)
	if len(all) != n {
		t.Fatalf("ListSVIDs = %d rows, want %d", len(all), n)
	}
	from := t0.Add(2 * time.Minute)
	var window []store.IssuedSVID
	for _, r := range all {
		if r.NotAfter.After(from) {
			window = append(window, r)
		}
	}
	for _, size := range []int{1, 4, n} {
		for _, q := range []store.SVIDQuery{{}, {NotExpiredAt: from}} {
			want := all
			if !q.NotExpiredAt.IsZero() {
				want = window
			}
			var got []store.IssuedSVID
			q.PageSize = size
			for pages := 0; ; pages++ {
				if pages > n+1 {
					t.Fatalf("page size %d: no end", size)
				}
				rows, next, err := s.ListSVIDs(bg, q)
				must(t, err)
				if len(rows) > size {
					t.Fatalf("page size %d: got %d rows", size, len(rows))
				}
				got = append(got, rows...)
				if next == "" {
					break
				}
				q.PageToken = next
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("page size %d, query %+v: pages joined differ from the unpaged list", size, q)
			}
		}
	}
	_, _, err = s.ListSVIDs(bg, store.SVIDQuery{PageSize: -1})
	wantErr(t, "ListSVIDs negative page size", err, store.ErrInvalid)
	_, _, err = s.ListSVIDs(bg, store.SVIDQuery{PageToken: "%%not a token%%"})
	wantErr(t, "ListSVIDs malformed page token", err, store.ErrInvalid)
}

func testAudit(t *testing.T, s store.Store) {
	for i := range 5 {
		must(t, s.AppendAudit(bg, auditFor("svid.mint", fmt.Sprint(i))))
	}
	ev, err := s.ListAudit(bg, 0)
	must(t, err)
	if len(ev) != 5 || ev[0].Target != "4" || ev[4].Target != "0" {
		t.Fatalf("ListAudit = %+v, want 5 events newest first", ev)
	}
	if !reflect.DeepEqual(ev[0], auditFor("svid.mint", "4")) {
		t.Fatalf("audit event read back as %+v", ev[0])
	}
	ev, err = s.ListAudit(bg, 2)
	must(t, err)
	if len(ev) != 2 || ev[0].Target != "4" || ev[1].Target != "3" {
		t.Fatalf("ListAudit(2) = %+v", ev)
	}
	// A zero time is stamped by the store.
	must(t, s.AppendAudit(bg, store.AuditEvent{Actor: "x", Action: "y"}))
	if ev, _ := s.ListAudit(bg, 1); len(ev) != 1 || ev[0].Time.IsZero() {
		t.Fatalf("zero-time event read back as %+v", ev)
	}
	_, err = s.ListAudit(bg, -1)
	wantErr(t, "ListAudit negative limit", err, store.ErrInvalid)
}

func token(hash, id string, single bool) store.JoinToken {
	return store.JoinToken{Hash: hash, SpiffeID: id, ExpiresAt: t0.Add(time.Hour), SingleUse: single, CreatedAt: t0}
}

func testTokens(t *testing.T, s store.Store) {
	multi := token("aa", "spiffe://example.org/proxy", false)
	single := token("bb", "spiffe://example.org/proxy", true)
	other := token("cc", "spiffe://example.org/other", false)
	for _, tk := range []store.JoinToken{multi, single, other} {
		must(t, s.CreateToken(bg, tk, auditFor("token.create", tk.SpiffeID)))
	}
	unchanged(t, s, "CreateToken duplicate hash", store.ErrAlreadyExists, func() error {
		return s.CreateToken(bg, token("aa", "spiffe://example.org/evil", false), nop)
	})
	unchanged(t, s, "CreateToken no expiry", store.ErrInvalid, func() error {
		tk := token("dd", "spiffe://example.org/x", false)
		tk.ExpiresAt = time.Time{}
		return s.CreateToken(bg, tk, nop)
	})
	now := t0.Add(time.Minute)
	for i := range 3 {
		got, err := s.UseToken(bg, "aa", now)
		must(t, err)
		if !reflect.DeepEqual(got, multi) {
			t.Fatalf("use %d of the reusable token = %+v, want %+v (the duplicate create must not have replaced it)", i, got, multi)
		}
	}
	got, err := s.UseToken(bg, "bb", now)
	must(t, err)
	if got.SpiffeID != single.SpiffeID || !got.UsedAt.Equal(now) {
		t.Fatalf("single-use redemption = %+v, want UsedAt %s", got, now)
	}
	_, err = s.UseToken(bg, "bb", now)
	wantErr(t, "second use of a single-use token", err, store.ErrNotFound)
	_, err = s.UseToken(bg, "aa", multi.ExpiresAt)
	wantErr(t, "UseToken at expiry", err, store.ErrNotFound)
	_, err = s.UseToken(bg, "zz", now)
	wantErr(t, "UseToken unknown", err, store.ErrNotFound)

	n, err := s.DeleteTokensFor(bg, "spiffe://example.org/proxy")
	must(t, err)
	if n != 2 {
		t.Fatalf("DeleteTokensFor = %d, want 2", n)
	}
	_, err = s.UseToken(bg, "aa", now)
	wantErr(t, "UseToken deleted", err, store.ErrNotFound)
	if _, err := s.UseToken(bg, "cc", now); err != nil {
		t.Fatalf("another identity's token went too: %v", err)
	}
}

func testTokenSingleUseRace(t *testing.T, s store.Store) {
	must(t, s.CreateToken(bg, token("once", "spiffe://example.org/p", true), nop))
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { _, errs[i] = s.UseToken(bg, "once", t0) })
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, store.ErrNotFound):
			t.Fatalf("UseToken: %v", err)
		}
	}
	if wins != 1 {
		t.Fatalf("%d concurrent redemptions of a single-use token succeeded, want 1", wins)
	}
}

func revoked(serial string, notAfter time.Time) store.RevokedSerial {
	return store.RevokedSerial{Serial: serial, CAID: "ca-1", SpiffeID: "spiffe://example.org/a", NotAfter: notAfter, RevokedAt: t0}
}

func testRevocations(t *testing.T, s store.Store) {
	r1, r2 := revoked("01", t0.Add(time.Hour)), revoked("02", t0.Add(3*time.Hour))
	must(t, s.RevokeSerials(bg, []store.RevokedSerial{r1, r2}, auditFor("svid.revoke", "a")))
	again := r1
	again.RevokedAt = t0.Add(time.Minute)
	r3 := revoked("03", t0.Add(2*time.Hour))
	must(t, s.RevokeSerials(bg, []store.RevokedSerial{again, r3}, nop))
	got, err := s.ListRevoked(bg)
	must(t, err)
	slices.SortFunc(got, func(a, b store.RevokedSerial) int { return strings.Compare(a.Serial, b.Serial) })
	if want := []store.RevokedSerial{r1, r2, r3}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListRevoked = %+v, want %+v (a serial keeps its first record)", got, want)
	}
	unchanged(t, s, "RevokeSerials with one bad serial", store.ErrInvalid, func() error {
		return s.RevokeSerials(bg, []store.RevokedSerial{revoked("04", t0.Add(time.Hour)), revoked("", t0.Add(time.Hour))}, nop)
	})
	n, err := s.PruneRevoked(bg, t0.Add(2*time.Hour))
	must(t, err)
	if n != 1 {
		t.Fatalf("PruneRevoked = %d, want 1", n)
	}
	got, _ = s.ListRevoked(bg)
	if len(got) != 2 {
		t.Fatalf("after prune: %+v", got)
	}
}

func testCRLNumbers(t *testing.T, s store.Store) {
	next := func(ca string, floor int64) int64 {
		t.Helper()
		n, err := s.NextCRLNumber(bg, ca, floor)
		must(t, err)
		return n
	}
	if n := next("ca-1", 1000); n != 1000 {
		t.Fatalf("first number = %d, want the floor 1000", n)
	}
	if n := next("ca-1", 1000); n != 1001 {
		t.Fatalf("same floor again = %d, want 1001", n)
	}
	if n := next("ca-1", 5); n != 1002 {
		t.Fatalf("lower floor (clock stepped back) = %d, want 1002", n)
	}
	if n := next("ca-1", 5000); n != 5000 {
		t.Fatalf("higher floor = %d, want 5000", n)
	}
	if n := next("ca-2", 7); n != 7 {
		t.Fatalf("another CA = %d, want its own counter at 7", n)
	}
	_, err := s.NextCRLNumber(bg, "", 1)
	wantErr(t, "NextCRLNumber empty ca", err, store.ErrInvalid)
	_, err = s.NextCRLNumber(bg, "ca-1", -1)
	wantErr(t, "NextCRLNumber negative floor", err, store.ErrInvalid)
	if n := next("ca-1", 0); n != 5001 {
		t.Fatalf("after refused calls = %d, want 5001", n)
	}
}

func testCancelledContext(t *testing.T, s store.Store) {
	ctx, cancel := context.WithCancel(bg)
	cancel()
	calls := map[string]func() error{
		"PutCA":       func() error { return s.PutCA(ctx, store.CARecord{ID: "c", Kind: "x509"}, nil) },
		"CreateEntry": func() error { return s.CreateEntry(ctx, entry("e", "spiffe://example.org/e"), nop) },
		"RecordSVID":  func() error { return s.RecordSVID(ctx, svid(1, t0)) },
		"AppendAudit": func() error { return s.AppendAudit(ctx, nop) },
		"CreateToken": func() error { return s.CreateToken(ctx, token("t", "spiffe://example.org/t", false), nop) },
		"RevokeSerials": func() error {
			return s.RevokeSerials(ctx, []store.RevokedSerial{revoked("01", t0)}, nop)
		},
		"NextCRLNumber": func() error { _, err := s.NextCRLNumber(ctx, "ca", 1); return err },
		"Watch":         func() error { _, err := s.Watch(ctx, 0); return err },
		"Campaign":      func() error { _, err := s.Campaign(ctx); return err },
	}
	for name, call := range calls {
		unchanged(t, s, name+" with a cancelled context", context.Canceled, call)
	}
	if n, err := s.NextCRLNumber(bg, "ca", 1); err != nil || n != 1 {
		t.Fatalf("NextCRLNumber after a cancelled call = %d, %v; want 1", n, err)
	}
}

// testConcurrentWriters runs writers of every kind at once (run it with
// -race) and checks that every write landed and the watch saw each watched
// one exactly once, in increasing revision order.
func testConcurrentWriters(t *testing.T, s store.Store) {
	rev0, err := s.Revision(bg)
	must(t, err)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	w, err := s.Watch(ctx, rev0)
	must(t, err)
	const writers, each = 4, 15
	// The watch is read while the writers run, as a projection would.
	var (
		mu      sync.Mutex
		seen    = map[string]int{}
		last    = rev0
		readErr error
	)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for r := range w.Responses() {
			mu.Lock()
			if r.Revision <= last && readErr == nil {
				readErr = fmt.Errorf("revision %d after %d", r.Revision, last)
			}
			last = r.Revision
			for _, ev := range r.Events {
				seen[string(ev.Kind)+"/"+ev.Key]++
			}
			mu.Unlock()
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, writers*each*3)
	for g := range writers {
		wg.Go(func() {
			for i := range each {
				id := fmt.Sprintf("g%d-%02d", g, i)
				if err := s.CreateEntry(bg, entry(id, "spiffe://example.org/"+id), nop); err != nil {
					errs <- err
				}
				if err := s.RecordSVID(bg, svid(g*1000+i, t0.Add(time.Hour))); err != nil {
					errs <- err
				}
				if err := s.RevokeSerials(bg, []store.RevokedSerial{revoked(id, t0.Add(time.Hour))}, nop); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := snapshot(t, s)
	if len(st.Entries) != writers*each || len(st.SVIDs) != writers*each || len(st.Revoked) != writers*each {
		t.Fatalf("after concurrent writes: %d entries, %d svids, %d revoked; want %d of each", len(st.Entries), len(st.SVIDs), len(st.Revoked), writers*each)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		at := last
		mu.Unlock()
		if at >= st.Rev {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("watch reached revision %d, store is at %d (watch err %v)", at, st.Rev, w.Err())
		}
		time.Sleep(time.Millisecond) // polling a condition with a deadline
	}
	cancel()
	<-readerDone
	if readErr != nil {
		t.Fatal(readErr)
	}
	if err := w.Err(); err != nil {
		t.Fatalf("watch ended with %v", err)
	}
	if len(seen) != 2*writers*each {
		t.Fatalf("watch saw %d keys, want %d", len(seen), 2*writers*each)
	}
	for k, n := range seen {
		if n != 1 {
			t.Fatalf("watch saw %s %d times", k, n)
		}
	}
}

// recv waits for the next watch response.
func recv(t *testing.T, w store.Watcher) store.WatchResponse {
	t.Helper()
	select {
	case r, ok := <-w.Responses():
		if !ok {
			t.Fatalf("watch ended: %v", w.Err())
		}
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no watch response within 10s")
	}
	panic("unreachable")
}

// change is what the suite checks of an event.
type change struct {
	Kind store.Kind
	Op   store.Op
	Key  string
}

func (c change) String() string { return fmt.Sprintf("%s %s %s", c.Op, c.Kind, c.Key) }

// step is one write of the watch script with the changes it must produce
// (none for a write of unwatched state or a failing one).
type step struct {
	name string
	do   func(store.Store) error
	fail error
	want []change
}

func script() []step {
	ca := store.CARecord{ID: "ca-1", Kind: "x509", State: store.CAPrepared, CreatedAt: t0}
	return []step{
		{name: "create e1", do: func(s store.Store) error {
			return s.CreateEntry(bg, entry("e1", "spiffe://example.org/a", "unix:uid:1"), nop)
		}, want: []change{{store.KindEntry, store.OpPut, "e1"}}},
		{name: "create e1 again (fails)", fail: store.ErrAlreadyExists, do: func(s store.Store) error {
			return s.CreateEntry(bg, entry("e1", "spiffe://example.org/b"), nop)
		}},
		{name: "record svid (unwatched)", do: func(s store.Store) error { return s.RecordSVID(bg, svid(1, t0.Add(time.Hour))) }},
		{name: "put ca", do: func(s store.Store) error { return s.PutCA(bg, ca, nil) },
			want: []change{{store.KindCA, store.OpPut, "ca-1"}}},
		{name: "update e1", do: func(s store.Store) error {
			_, err := s.UpdateEntry(bg, entry("e1", "spiffe://example.org/a2", "unix:uid:1"), nop)
			return err
		}, want: []change{{store.KindEntry, store.OpPut, "e1"}}},
		{name: "revoke two", do: func(s store.Store) error {
			return s.RevokeSerials(bg, []store.RevokedSerial{revoked("01", t0.Add(time.Hour)), revoked("02", t0.Add(2*time.Hour))}, nop)
		}, want: []change{{store.KindRevoked, store.OpPut, "01"}, {store.KindRevoked, store.OpPut, "02"}}},
		{name: "create single-use token", do: func(s store.Store) error {
			return s.CreateToken(bg, token("t1", "spiffe://example.org/p", true), nop)
		}, want: []change{{store.KindToken, store.OpPut, "t1"}}},
		{name: "create reusable token", do: func(s store.Store) error {
			return s.CreateToken(bg, token("t2", "spiffe://example.org/p", false), nop)
		}, want: []change{{store.KindToken, store.OpPut, "t2"}}},
		{name: "use single-use token", do: func(s store.Store) error { _, err := s.UseToken(bg, "t1", t0); return err },
			want: []change{{store.KindToken, store.OpPut, "t1"}}},
		{name: "use reusable token (no change)", do: func(s store.Store) error { _, err := s.UseToken(bg, "t2", t0); return err }},
		{name: "delete tokens", do: func(s store.Store) error { _, err := s.DeleteTokensFor(bg, "spiffe://example.org/p"); return err },
			want: []change{{store.KindToken, store.OpDelete, "t1"}, {store.KindToken, store.OpDelete, "t2"}}},
		{name: "prune revoked", do: func(s store.Store) error { _, err := s.PruneRevoked(bg, t0.Add(90*time.Minute)); return err },
			want: []change{{store.KindRevoked, store.OpDelete, "01"}}},
		{name: "delete e1", do: func(s store.Store) error { _, err := s.DeleteEntry(bg, "e1", nop); return err },
			want: []change{{store.KindEntry, store.OpDelete, "e1"}}},
	}
}

func sortedChanges(evs []store.Event) []change {
	var out []change
	for _, ev := range evs {
		out = append(out, change{ev.Kind, ev.Op, ev.Key})
	}
	// Within one commit the order of different keys is the backend's.
	slices.SortFunc(out, func(a, b change) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// checkEvent checks that an event carries the value its kind names.
func checkEvent(t *testing.T, ev store.Event, rev int64) {
	t.Helper()
	if ev.Revision != rev {
		t.Fatalf("%s %s has revision %d in a response at %d", ev.Op, ev.Key, ev.Revision, rev)
	}
	var key string
	var set int
	if ev.Entry != nil {
		set, key = set+1, ev.Entry.ID
	}
	if ev.CA != nil {
		set, key = set+1, ev.CA.ID
	}
	if ev.Revoked != nil {
		set, key = set+1, ev.Revoked.Serial
	}
	if ev.Token != nil {
		set, key = set+1, ev.Token.Hash
	}
	if set != 1 || key != ev.Key {
		t.Fatalf("event %s %s %s carries %d values (key %q), want exactly its own", ev.Op, ev.Kind, ev.Key, set, key)
	}
}

// runScript applies the script, checking after each step that Revision
// moved exactly when the step changed watched state, and returns the
// revision after each step.
func runScript(t *testing.T, s store.Store) []int64 {
	t.Helper()
	var revs []int64
	prev, err := s.Revision(bg)
	must(t, err)
	for _, st := range script() {
		err := st.do(s)
		if st.fail != nil {
			wantErr(t, st.name, err, st.fail)
		} else {
			must(t, err)
		}
		rev, err := s.Revision(bg)
		must(t, err)
		if len(st.want) > 0 && rev <= prev {
			t.Fatalf("%s: revision %d did not advance from %d", st.name, rev, prev)
		}
		if rev < prev {
			t.Fatalf("%s: revision went back from %d to %d", st.name, prev, rev)
		}
		revs = append(revs, rev)
		prev = rev
	}
	return revs
}

// expect reads responses until the watch reaches rev and checks that they
// hold exactly want, in order.
func expect(t *testing.T, w store.Watcher, from, rev int64, want [][]change) {
	t.Helper()
	var got [][]change
	last := from
	for last < rev {
		r := recv(t, w)
		if r.Revision <= last {
			t.Fatalf("response at revision %d after %d", r.Revision, last)
		}
		last = r.Revision
		if len(r.Events) == 0 {
			continue // progress notification
		}
		for _, ev := range r.Events {
			checkEvent(t, ev, r.Revision)
		}
		got = append(got, sortedChanges(r.Events))
	}
	if last != rev {
		t.Fatalf("watch passed revision %d to %d", rev, last)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("watch delivered\n  %v\nwant\n  %v", got, want)
	}
}

func wantedFrom(steps []step) [][]change {
	var out [][]change
	for _, st := range steps {
		if len(st.want) > 0 {
			w := slices.Clone(st.want)
			slices.SortFunc(w, func(a, b change) int { return strings.Compare(a.String(), b.String()) })
			out = append(out, w)
		}
	}
	return out
}

func testWatchOrder(t *testing.T, s store.Store) {
	rev0, err := s.Revision(bg)
	must(t, err)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	live, err := s.Watch(ctx, rev0)
	must(t, err)
	revs := runScript(t, s)
	expect(t, live, rev0, revs[len(revs)-1], wantedFrom(script()))

	// Values: a put carries the value a read returns, a delete the last one.
	replay, err := s.Watch(ctx, rev0)
	must(t, err)
	first := recv(t, replay)
	e := entry("e1", "spiffe://example.org/a", "unix:uid:1")
	if len(first.Events) != 1 || !reflect.DeepEqual(first.Events[0].Entry, &e) {
		t.Fatalf("create event carries %+v, want %+v", first.Events[0].Entry, e)
	}
	var del *store.Event
	for del == nil {
		r := recv(t, replay)
		for i, ev := range r.Events {
			if ev.Kind == store.KindEntry && ev.Op == store.OpDelete {
				del = &r.Events[i]
			}
		}
	}
	if e2 := entry("e1", "spiffe://example.org/a2", "unix:uid:1"); !reflect.DeepEqual(del.Entry, &e2) {
		t.Fatalf("delete event carries %+v, want the last value %+v", del.Entry, e2)
	}

	// Nothing more arrives: the live watch is at the store's revision.
	select {
	case r := <-live.Responses():
		if len(r.Events) > 0 {
			t.Fatalf("unexpected response after the script: %+v", r)
		}
	default:
	}
}

func testWatchResume(t *testing.T, s store.Store) {
	rev0, err := s.Revision(bg)
	must(t, err)
	revs := runScript(t, s)
	steps := script()
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	for i := range steps {
		w, err := s.Watch(ctx, revs[i])
		must(t, err)
		expect(t, w, revs[i], revs[len(revs)-1], wantedFrom(steps[i+1:]))
	}
	// Resume from the start replays everything.
	w, err := s.Watch(ctx, rev0)
	must(t, err)
	expect(t, w, rev0, revs[len(revs)-1], wantedFrom(steps))
	// A watch from a revision not reached yet waits for it.
	future := revs[len(revs)-1]
	w, err = s.Watch(ctx, future)
	must(t, err)
	must(t, s.CreateEntry(bg, entry("late", "spiffe://example.org/late"), nop))
	r := recv(t, w)
	if len(r.Events) != 1 || r.Events[0].Key != "late" || r.Revision <= future {
		t.Fatalf("live event after resume = %+v", r)
	}
	_, err = s.Watch(ctx, -1)
	wantErr(t, "Watch negative revision", err, store.ErrInvalid)
}

func testWatchCompacted(t *testing.T, s store.Store) {
	c, ok := s.(Compacter)
	if !ok {
		t.Skip("backend has no Compact")
	}
	rev0, err := s.Revision(bg)
	must(t, err)
	revs := runScript(t, s)
	mid := revs[4]
	must(t, c.Compact(bg, mid))
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	_, err = s.Watch(ctx, rev0)
	wantErr(t, "Watch before the compaction point", err, store.ErrCompacted)
	w, err := s.Watch(ctx, mid)
	must(t, err)
	expect(t, w, mid, revs[len(revs)-1], wantedFrom(script()[5:]))
}

// testWatchSlowConsumer opens a watch nobody reads and keeps writing: the
// writers must not wait for it, and once the changes it has not received are
// no longer retained it ends with ErrCompacted.
func testWatchSlowConsumer(t *testing.T, s store.Store) {
	rev0, err := s.Revision(bg)
	must(t, err)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	w, err := s.Watch(ctx, rev0)
	must(t, err)
	// The slow watcher may hold the first change in hand; the one after it
	// must be gone.
	must(t, s.CreateEntry(bg, entry("first", "spiffe://example.org/first"), nop))
	first, err := s.Revision(bg)
	must(t, err)
	const maxWrites = 20000
	compacted := false
	for i := 0; i < maxWrites && !compacted; i++ {
		if err := s.RevokeSerials(bg, []store.RevokedSerial{revoked(fmt.Sprintf("s%05d", i), t0.Add(time.Hour))}, nop); err != nil {
			t.Fatal(err)
		}
		if i%50 == 49 {
			if c, ok := s.(Compacter); ok && i >= 999 {
				rev, _ := s.Revision(bg)
				must(t, c.Compact(bg, rev))
			}
			pctx, pcancel := context.WithCancel(bg)
			_, err := s.Watch(pctx, first)
			pcancel()
			if errors.Is(err, store.ErrCompacted) {
				compacted = true
			} else {
				must(t, err)
			}
		}
	}
	if !compacted {
		t.Skipf("backend retains more than %d changes and has no Compact", maxWrites)
	}
	deadline := time.After(10 * time.Second)
	last := rev0
	for {
		select {
		case r, ok := <-w.Responses():
			if !ok {
				wantErr(t, "slow watcher's end", w.Err(), store.ErrCompacted)
				return
			}
			if r.Revision <= last {
				t.Fatalf("revision %d after %d", r.Revision, last)
			}
			last = r.Revision
		case <-deadline:
			t.Fatalf("slow watcher not ended (at revision %d)", last)
		}
	}
}

func testWatchEnds(t *testing.T, s store.Store) {
	ctx, cancel := context.WithCancel(bg)
	w, err := s.Watch(ctx, 0)
	must(t, err)
	cancel()
	for range w.Responses() {
	}
	if err := w.Err(); err != nil {
		t.Fatalf("after cancel Err = %v, want nil", err)
	}

	w, err = s.Watch(bg, 0)
	must(t, err)
	must(t, s.Close())
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-w.Responses():
			if ok {
				continue
			}
			wantErr(t, "watch end on Close", w.Err(), store.ErrClosed)
			return
		case <-deadline:
			t.Fatal("watch not ended by Close")
		}
	}
}

func testLeadership(t *testing.T, s store.Store) {
	l, err := s.Campaign(bg)
	must(t, err)
	select {
	case <-l.Done():
		t.Fatal("new leadership is already done")
	default:
	}
	ctx, cancel := context.WithTimeout(bg, 50*time.Millisecond)
	_, err = s.Campaign(ctx)
	cancel()
	wantErr(t, "second Campaign while led", err, context.DeadlineExceeded)

	// The campaigner reports over a channel, not t.Error: if the test
	// fails first it ends with ErrClosed after the test has returned.
	got := make(chan store.Leadership, 1)
	campaignErr := make(chan error, 1)
	go func() {
		l2, err := s.Campaign(bg)
		campaignErr <- err
		got <- l2
	}()
	must(t, l.Resign(bg))
	<-l.Done()
	must(t, l.Resign(bg)) // idempotent
	var l2 store.Leadership
	select {
	case l2 = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("waiting campaigner did not take over after Resign")
	}
	if err := <-campaignErr; err != nil {
		t.Fatalf("waiting Campaign: %v", err)
	}
	must(t, s.Close())
	select {
	case <-l2.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("leadership outlived the store")
	}
	_, err = s.Campaign(bg)
	wantErr(t, "Campaign after Close", err, store.ErrClosed)
}

func testClosed(t *testing.T, s store.Store) {
	must(t, s.CreateEntry(bg, entry("e", "spiffe://example.org/e"), nop))
	must(t, s.Close())
	must(t, s.Close())
	errs := map[string]error{}
	errs["PutCA"] = s.PutCA(bg, store.CARecord{ID: "c"}, nil)
	_, errs["ListCAs"] = s.ListCAs(bg)
	errs["CreateEntry"] = s.CreateEntry(bg, entry("f", "spiffe://example.org/f"), nop)
	_, errs["GetEntry"] = s.GetEntry(bg, "e")
	_, _, errs["ListEntries"] = s.ListEntries(bg, store.EntryQuery{})
	_, errs["DeleteEntry"] = s.DeleteEntry(bg, "e", nop)
	errs["RecordSVID"] = s.RecordSVID(bg, svid(1, t0))
	_, _, errs["ListSVIDs"] = s.ListSVIDs(bg, store.SVIDQuery{})
	errs["AppendAudit"] = s.AppendAudit(bg, nop)
	errs["RevokeSerials"] = s.RevokeSerials(bg, []store.RevokedSerial{revoked("01", t0)}, nop)
	_, errs["NextCRLNumber"] = s.NextCRLNumber(bg, "ca", 1)
	_, errs["Revision"] = s.Revision(bg)
	_, errs["Watch"] = s.Watch(bg, 0)
	for name, err := range errs {
		wantErr(t, name+" after Close", err, store.ErrClosed)
	}
}
