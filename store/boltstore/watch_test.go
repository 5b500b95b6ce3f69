package boltstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// After a restart the revision continues from the file and the events
// before it count as compacted: the log is memory only (see watch.go).
func TestWatch_RevisionSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)
	for i := range 3 {
		id := fmt.Sprintf("e%d", i)
		if err := s.CreateEntry(ctx, testEntry(id, "spiffe://example.org/"+id), store.AuditEvent{}); err != nil {
			t.Fatal(err)
		}
	}
	rev, err := s.Revision(ctx)
	if err != nil || rev != 3 {
		t.Fatalf("Revision = %d, %v; want 3", rev, err)
	}
	s = reopen(t, s, path)
	if got, _ := s.Revision(ctx); got != rev {
		t.Fatalf("after reopen Revision = %d, want %d", got, rev)
	}
	if _, err := s.Watch(ctx, rev-1); !errors.Is(err, store.ErrCompacted) {
		t.Fatalf("Watch from before the restart: %v, want ErrCompacted", err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := s.Watch(wctx, rev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.DeleteEntry(ctx, "e1", store.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-w.Responses():
		if r.Revision != rev+1 || len(r.Events) != 1 || r.Events[0].Op != store.OpDelete || r.Events[0].Key != "e1" {
			t.Fatalf("first event after reopen = %+v, want delete e1 at %d", r, rev+1)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
}

// The inventory is the hot write path: a group commit neither bumps the
// revision nor wakes watchers.
func TestWatch_InventoryIsUnwatched(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	if err := s.CreateEntry(ctx, testEntry("e", "spiffe://example.org/e"), store.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := s.RecordSVID(ctx, testSVID(i, t0.Add(time.Hour))); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AppendAudit(ctx, store.AuditEvent{Action: "svid.mint"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PruneSVIDs(ctx, t0.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if rev, _ := s.Revision(ctx); rev != 1 {
		t.Fatalf("Revision = %d after one watched write and only unwatched ones since, want 1", rev)
	}
}

// The log is bounded by events, not commits, and always keeps the newest
// commit, however big.
func TestWatch_LogBound(t *testing.T) {
	ctx := context.Background()
	s := openOpts(t, filepath.Join(t.TempDir(), "meshid.db"), Options{UnsafeNoSync: true, WatchRetain: 10})
	for i := range 8 {
		if err := s.RevokeSerials(ctx, []store.RevokedSerial{{Serial: fmt.Sprint(i), NotAfter: t0}}, store.AuditEvent{}); err != nil {
			t.Fatal(err)
		}
	}
	big := make([]store.RevokedSerial, 25)
	for i := range big {
		big[i] = store.RevokedSerial{Serial: fmt.Sprintf("big%d", i), NotAfter: t0}
	}
	if err := s.RevokeSerials(ctx, big, store.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	s.hub.mu.Lock()
	nlog, nev, compacted := len(s.hub.log), s.hub.nevents, s.hub.compacted
	s.hub.mu.Unlock()
	if nlog != 1 || nev != 25 || compacted != 8 {
		t.Fatalf("log holds %d commits, %d events, compacted at %d; want only the 25-event commit, compacted at 8", nlog, nev, compacted)
	}
	if _, err := s.Watch(ctx, 7); !errors.Is(err, store.ErrCompacted) {
		t.Fatalf("Watch(7) = %v, want ErrCompacted", err)
	}
}

// CRL numbers are in the file: a restart does not reuse one, even with a
// clock that went back.
func TestNextCRLNumber_SurvivesReopen(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)
	n, err := s.NextCRLNumber(ctx, "ca-1", 1_000_000)
	if err != nil || n != 1_000_000 {
		t.Fatalf("NextCRLNumber = %d, %v", n, err)
	}
	s = reopen(t, s, path)
	if n, err := s.NextCRLNumber(ctx, "ca-1", 10); err != nil || n != 1_000_001 {
		t.Fatalf("after reopen NextCRLNumber = %d, %v; want 1000001", n, err)
	}
}
