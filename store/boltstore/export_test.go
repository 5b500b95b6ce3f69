package boltstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/storetest"
)

func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "meshid.db")
	s, err := Open(path, Options{UnsafeNoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, path
}

// dumpBuckets is every key and value of every bucket, with the revision
// left out (an Import is one commit where the source had many).
func dumpBuckets(t *testing.T, s *Store) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			out[string(name)+" sequence"] = fmt.Sprint(b.Sequence())
			return b.ForEach(func(k, v []byte) error {
				if bytes.Equal(name, bucketMeta) && bytes.Equal(k, keyRevision) {
					return nil
				}
				out[fmt.Sprintf("%s/%x", name, k)] = fmt.Sprintf("%x", v)
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestImportWritesWhatTheAPIWrote: the imported file holds, bucket by
// bucket, the same keys and bytes as the file the normal write path made,
// indexes and the audit sequence included; it survives a reopen.
func TestImportWritesWhatTheAPIWrote(t *testing.T) {
	ctx := context.Background()
	src, _ := openTemp(t)
	storetest.FillForMigration(t, src)
	snap, err := src.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dst, path := openTemp(t)
	if err := dst.Import(ctx, snap); err != nil {
		t.Fatal(err)
	}
	want, got := dumpBuckets(t, src), dumpBuckets(t, dst)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: imported %q, written by the API %q", k, got[k], v)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: only in the imported file", k)
		}
	}

	rev, err := dst.Revision(ctx)
	if err != nil || rev != 1 {
		t.Fatalf("revision after importing into a new store = %d, %v; want 1", rev, err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	re, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	again, err := re.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := store.DiffSnapshots(snap, again); len(d) > 0 {
		t.Fatalf("after reopening the imported file:\n%s", strings.Join(d, "\n"))
	}
	if rev, err := re.Revision(ctx); err != nil || rev != 1 {
		t.Fatalf("revision after reopening = %d, %v; want 1", rev, err)
	}
}

// TestImportResetsWatches: a watch open across an Import ends with
// ErrCompacted (the imported state is not a stream of events it could
// apply), and one from the new revision sees the next write.
func TestImportResetsWatches(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src, _ := openTemp(t)
	storetest.FillForMigration(t, src)
	snap, err := src.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dst, _ := openTemp(t)
	// Revision 1 comes from a write that was undone: the store is empty
	// again but not new.
	if err := dst.PutAgent(ctx, store.AgentRecord{ID: "a"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.DeleteAgent(ctx, "a", store.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	// The delete wrote an audit event: clear it by hand, as a wiped store
	// would be, so that only the revision is left over.
	if err := dst.db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketAudit); err != nil {
			return err
		}
		_, err := tx.CreateBucket(bucketAudit)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	rev0, _ := dst.Revision(ctx)
	w, err := dst.Watch(ctx, rev0)
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.Import(ctx, snap); err != nil {
		t.Fatal(err)
	}
	select {
	case r, ok := <-w.Responses():
		if ok {
			t.Fatalf("the watch open across the import got %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the watch open across the import did not end")
	}
	if !errors.Is(w.Err(), store.ErrCompacted) {
		t.Fatalf("watch open across the import ended with %v, want ErrCompacted", w.Err())
	}
	rev, _ := dst.Revision(ctx)
	if rev != rev0+1 {
		t.Fatalf("revision %d -> %d over the import, want one step", rev0, rev)
	}
	if _, err := dst.Watch(ctx, rev0); !errors.Is(err, store.ErrCompacted) {
		t.Fatalf("watch from before the import: %v, want ErrCompacted", err)
	}
	w2, err := dst.Watch(ctx, rev)
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.RevokeSerials(ctx, []store.RevokedSerial{{Serial: "99", NotAfter: time.Now().Add(time.Hour)}}, store.AuditEvent{}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-w2.Responses():
		if r.Revision != rev+1 || len(r.Events) != 1 || r.Events[0].Key != "99" {
			t.Fatalf("watch after the import got %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no watch response after the import")
	}
}

// TestImportRefusesInvalidSnapshots: a snapshot the write path would not
// have accepted is refused with ErrInvalid and nothing is written.
func TestImportRefusesInvalidSnapshots(t *testing.T) {
	ctx := context.Background()
	src, _ := openTemp(t)
	storetest.FillForMigration(t, src)
	good, err := src.Export(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(*store.Snapshot){
		"two entries with the same id, selectors and parent": func(s *store.Snapshot) {
			e := s.Entries[0]
			e.ID = "zz-copy"
			s.Entries = append(s.Entries, e)
		},
		"a repeated CA id":                func(s *store.Snapshot) { s.CAs = append(s.CAs, s.CAs[0]) },
		"an inventory row with no serial": func(s *store.Snapshot) { s.SVIDs[3].Serial = "" },
		"an inventory row with no expiry": func(s *store.Snapshot) { s.SVIDs[3].NotAfter = time.Time{} },
		"a token with no hash":            func(s *store.Snapshot) { s.Tokens[1].Hash = "" },
		"a revoked serial too long":       func(s *store.Snapshot) { s.Revoked[0].Serial = strings.Repeat("a", maxSerialLen+1) },
		"an agent with no id":             func(s *store.Snapshot) { s.Agents[0].ID = "" },
		"a negative CRL number":           func(s *store.Snapshot) { s.CRLNumbers["x"] = -1 },
	}
	for what, spoil := range bad {
		t.Run(strings.ReplaceAll(what, " ", "_"), func(t *testing.T) {
			snap, err := src.Export(ctx) // a copy of its own to spoil
			if err != nil {
				t.Fatal(err)
			}
			spoil(&snap)
			dst, _ := openTemp(t)
			before := dumpBuckets(t, dst)
			if err := dst.Import(ctx, snap); !errors.Is(err, store.ErrInvalid) {
				t.Fatalf("Import of a snapshot with %s: %v, want ErrInvalid", what, err)
			}
			if after := dumpBuckets(t, dst); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("refused Import changed the file:\n%v\n%v", before, after)
			}
			// The same store takes the good snapshot afterwards.
			if err := dst.Import(ctx, good); err != nil {
				t.Fatal(err)
			}
		})
	}
}
