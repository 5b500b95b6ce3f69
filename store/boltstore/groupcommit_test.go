package boltstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// Watched writes queued while a commit is in progress share the next
// commit with each other and with inventory rows; a write that fails in
// the group gets its own error and leaves no trace, the others commit,
// every one durable, and the watch sees each success at its own revision,
// in the order the writes were queued.
func TestGroupCommit_WatchedWritesShareCommits(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)
	rev0, err := s.Revision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := s.Watch(wctx, rev0)
	if err != nil {
		t.Fatal(err)
	}

	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	s.beforeCommit = func() { <-gate }
	t.Cleanup(release)
	entry := func(i int) store.Entry {
		return store.Entry{ID: fmt.Sprintf("e%02d", i), SpiffeID: fmt.Sprintf("spiffe://example.org/w%d", i),
			Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}}, TTL: time.Hour, CreatedAt: t0}
	}
	audit := store.AuditEvent{Time: t0, Actor: "test", Action: "entry.create"}
	first := make(chan error, 1)
	go func() { first <- s.CreateEntry(ctx, entry(0), audit) }()
	waitFor(t, "the committer to take the first write", func() bool { return s.commits.Load() == 1 })

	// Queued one at a time, so the queue's order is known.
	errRefused := errors.New("refused")
	type call struct {
		key  string // the watched key it writes, "" for none
		want error
		run  func() error
	}
	var calls []call
	for i := 1; i <= 24; i++ {
		switch {
		case i == 7:
			calls = append(calls, call{"", store.ErrAlreadyExists, func() error { return s.CreateEntry(ctx, entry(0), audit) }})
		case i == 13:
			calls = append(calls, call{"", errRefused, func() error {
				_, err := s.UpdateAgent(ctx, "spiffe://example.org/meshid/agent/join/x", func(r *store.AgentRecord, _ bool) error {
					r.Node = "x"
					return errRefused
				}, nil)
				return err
			}})
		case i == 14:
			calls = append(calls, call{"", nil, func() error { return s.RecordSVID(ctx, testSVID(1, t0.Add(time.Hour))) }})
		case i == 23:
			// Last in the group: the failure after every other member.
			calls = append(calls, call{"", store.ErrAlreadyExists, func() error { return s.CreateEntry(ctx, entry(3), audit) }})
		default:
			e := entry(i)
			calls = append(calls, call{e.ID, nil, func() error { return s.CreateEntry(ctx, e, audit) }})
		}
	}
	errs := make([]chan error, len(calls))
	for i, c := range calls {
		errs[i] = make(chan error, 1)
		go func() { errs[i] <- c.run() }()
		waitFor(t, fmt.Sprintf("write %d to be queued", i), func() bool {
			s.qmu.Lock()
			defer s.qmu.Unlock()
			return len(s.queue) == i+1
		})
	}
	release()
	if err := <-first; err != nil {
		t.Fatalf("first write: %v", err)
	}
	var wantKeys []string
	for i, c := range calls {
		err := <-errs[i]
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Fatalf("write %d: %v, want %v", i, err, c.want)
		}
		if c.key != "" {
			wantKeys = append(wantKeys, c.key)
		}
	}
	// The first write's commit, then the group: each failure costs a
	// rolled-back attempt, the commit of the members before it and the
	// attempt that answers it alone, so 1 + 3×3 + 1 = 11 here; one commit
	// per write would be 25.
	if n := s.commits.Load(); n > 11 {
		t.Fatalf("%d commits for %d writes queued together: they were not grouped", n, len(calls)+1)
	}

	wantKeys = append([]string{"e00"}, wantKeys...)
	prev := rev0
	for i, key := range wantKeys {
		select {
		case r := <-w.Responses():
			if r.Revision != prev+1 || len(r.Events) != 1 || r.Events[0].Key != key || r.Events[0].Revision != r.Revision {
				t.Fatalf("watch response %d: revision %d (previous %d), events %+v; want one event for %s", i, r.Revision, prev, r.Events, key)
			}
			prev = r.Revision
		case <-time.After(10 * time.Second):
			t.Fatalf("no watch response %d", i)
		}
	}
	if rev, _ := s.Revision(ctx); rev != prev {
		t.Fatalf("Revision %d, want %d: the failed writes took revisions", rev, prev)
	}

	s = reopen(t, s, path)
	if rev, _ := s.Revision(ctx); rev != prev {
		t.Fatalf("Revision after reopen %d, want %d", rev, prev)
	}
	got, _, err := s.ListEntries(ctx, store.EntryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(wantKeys) {
		t.Fatalf("%d entries after reopen, want %d", len(got), len(wantKeys))
	}
	if _, err := s.GetAgent(ctx, "spiffe://example.org/meshid/agent/join/x"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the refused agent update left a record: %v", err)
	}
	rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil || len(rows) != 1 {
		t.Fatalf("inventory after reopen: %d rows, %v; want the one row of the group", len(rows), err)
	}
}
