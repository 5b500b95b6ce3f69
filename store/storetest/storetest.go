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
		{"LastSVIDNotAfter", testLastSVIDNotAfter},
		{"Audit", testAudit},
		{"Tokens", testTokens},
		{"TokenSingleUseRace", testTokenSingleUseRace},
		{"Agents", testAgents},
		{"AttestAgent", testAttestAgent},
		{"AttestAgentRace", testAttestAgentRace},
		{"Revocations", testRevocations},
		{"CRLNumbers", testCRLNumbers},
		{"SignedCRLs", testSignedCRLs},
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
	CRLs    *store.SignedCRLs
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
	switch c, err := s.GetCRLs(bg); {
	case err == nil:
		st.CRLs = &c
	case !errors.Is(err, store.ErrNotFound):
		t.Fatal(err)
	}
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
		"PutCRLs":       func() error { return s.PutCRLs(ctx, signedCRLs(1)) },
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
	errs["PutCRLs"] = s.PutCRLs(bg, signedCRLs(1))
	_, errs["GetCRLs"] = s.GetCRLs(bg)
	_, errs["Revision"] = s.Revision(bg)
	_, errs["Watch"] = s.Watch(bg, 0)
	for name, err := range errs {
		wantErr(t, name+" after Close", err, store.ErrClosed)
	}
}
