package storetest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

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
		{name: "use single-use token", do: func(s store.Store) error { _, err := s.UseToken(bg, "t1", t0, "c1"); return err },
			want: []change{{store.KindToken, store.OpPut, "t1"}}},
		{name: "use reusable token (no change)", do: func(s store.Store) error { _, err := s.UseToken(bg, "t2", t0, "c1"); return err }},
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
