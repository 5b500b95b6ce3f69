package boltstore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"

	"github.com/meshid/meshid/store"
)

// lockHelperEnv makes the test binary act as a second meshid process that
// holds the store open (see TestOpen_LockedByOtherProcess).
const lockHelperEnv = "MESHID_BOLTSTORE_LOCK_HELPER"

func TestMain(m *testing.M) {
	if path := os.Getenv(lockHelperEnv); path != "" {
		os.Exit(lockHelper(path))
	}
	if path := os.Getenv(crashHelperEnv); path != "" {
		os.Exit(crashHelper(path))
	}
	if path := os.Getenv(openHelperEnv); path != "" {
		os.Exit(openHelper(path))
	}
	goleak.VerifyTestMain(m)
}

// lockHelper opens the store, says so on stdout and keeps it open until its
// stdin is closed.
func lockHelper(path string) int {
	s, err := Open(path, Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("locked")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	if err := s.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func openT(t testing.TB, path string) *Store {
	t.Helper()
	return openOpts(t, path, Options{Now: func() time.Time { return t0 }})
}

func openOpts(t testing.TB, path string, opts Options) *Store {
	t.Helper()
	s, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newStore(t testing.TB) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data", "meshid.db")
	return openT(t, path), path
}

func reopen(t testing.TB, s *Store, path string) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return openT(t, path)
}

func testSVID(i int, notAfter time.Time) store.IssuedSVID {
	return store.IssuedSVID{
		Serial:    fmt.Sprintf("%032x", i),
		SpiffeID:  fmt.Sprintf("spiffe://cluster.local/ns/default/sa/sa%d", i%17),
		NotBefore: notAfter.Add(-24 * time.Hour),
		NotAfter:  notAfter,
		EntryID:   fmt.Sprintf("entry-%d", i%5),
		Requester: "unix:uid:1000",
		CAID:      "ca-1",
		IssuedAt:  notAfter.Add(-24*time.Hour + time.Second),
	}
}

func testEntry(id, spiffeID string, sels ...string) store.Entry {
	e := store.Entry{ID: id, SpiffeID: spiffeID, TTL: time.Hour, CreatedAt: t0}
	for _, s := range sels {
		typ, val, _ := strings.Cut(s, ":")
		e.Selectors = append(e.Selectors, store.Selector{Type: typ, Value: val})
	}
	return e
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)

	ca := store.CARecord{
		ID: "ca-1", Kind: "x509", State: store.CAActive,
		CertDER:   []byte{0x30, 0x82, 1, 2},
		ChainDER:  [][]byte{{1, 2, 3}, {4, 5}},
		SealedKey: []byte("sealed"),
		NotBefore: t0, NotAfter: t0.Add(365 * 24 * time.Hour), CreatedAt: t0.Add(time.Nanosecond),
	}
	jwtCA := store.CARecord{ID: "jwt-1", Kind: "jwt", State: store.CAPrepared, PublicKey: []byte("pkix"), SealedKey: []byte("k"), CreatedAt: t0.Add(-time.Hour)}
	entry := store.Entry{
		ID: "e1", SpiffeID: "spiffe://cluster.local/ns/a/sa/b",
		Selectors: []store.Selector{{Type: "k8s", Value: "ns:a"}, {Type: "k8s", Value: "sa:b"}, {Type: "unix", Value: ""}},
		TTL:       90 * time.Minute, DNSNames: []string{"b.a.svc", "b"}, CreatedAt: t0,
	}
	bare := store.Entry{ID: "e0", SpiffeID: "spiffe://cluster.local/x"} // zero times, no slices
	svid := testSVID(7, t0.Add(24*time.Hour))
	svid.EntryID = "" // admin mint
	audit := store.AuditEvent{Time: t0.Add(time.Second), Actor: "admin uid:0", Action: "svid.mint", Target: "spiffe://x", Detail: "ttl=1h"}

	if err := s.PutCA(ctx, ca, &store.AuditEvent{Actor: "server", Action: "ca.prepare", Target: ca.ID}); err != nil {
		t.Fatal(err)
	}
	if err := s.PutCA(ctx, jwtCA, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateEntry(ctx, entry, store.AuditEvent{Actor: "admin", Action: "entry.create", Target: entry.ID}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateEntry(ctx, bare, store.AuditEvent{Actor: "admin", Action: "entry.create", Target: bare.ID}); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordSVID(ctx, svid); err != nil {
		t.Fatal(err)
	}
	if err := s.AppendAudit(ctx, audit); err != nil {
		t.Fatal(err)
	}

	wantAudit := []store.AuditEvent{
		audit,
		{Time: t0, Actor: "admin", Action: "entry.create", Target: "e0"}, // zero Time stamped by Options.Now
		{Time: t0, Actor: "admin", Action: "entry.create", Target: "e1"},
		{Time: t0, Actor: "server", Action: "ca.prepare", Target: "ca-1"},
	}
	checks := []struct {
		name string
		get  func() (any, error)
		want any
	}{
		{"ListCAs", func() (any, error) { return s.ListCAs(ctx) }, []store.CARecord{jwtCA, ca}},
		{"GetEntry", func() (any, error) { return s.GetEntry(ctx, "e1") }, entry},
		{"GetEntry bare", func() (any, error) { return s.GetEntry(ctx, "e0") }, bare},
		{"ListEntries", func() (any, error) {
			es, next, err := s.ListEntries(ctx, store.EntryQuery{})
			if next != "" {
				return nil, fmt.Errorf("next = %q", next)
			}
			return es, err
		}, []store.Entry{bare, entry}},
		{"ListSVIDs", func() (any, error) {
			rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
			return rows, err
		}, []store.IssuedSVID{svid}},
		{"ListAudit", func() (any, error) { return s.ListAudit(ctx, 0) }, wantAudit},
		{"ListAudit limit", func() (any, error) { return s.ListAudit(ctx, 2) }, wantAudit[:2]},
	}
	for round, name := range []string{"same handle", "after reopen"} {
		if round == 1 {
			s = reopen(t, s, path)
		}
		for _, c := range checks {
			t.Run(name+"/"+c.name, func(t *testing.T) {
				got, err := c.get()
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, c.want) {
					t.Errorf("got  %+v\nwant %+v", got, c.want)
				}
			})
		}
	}
}

// counts is the observable size of the entry side of the store.
func counts(t *testing.T, s *Store) (entries, audit int) {
	t.Helper()
	es, _, err := s.ListEntries(context.Background(), store.EntryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	evs, err := s.ListAudit(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	var uniq int
	_ = s.db.View(func(tx *bolt.Tx) error { uniq = tx.Bucket(bucketEntryUniq).Stats().KeyN; return nil })
	if uniq != len(es) {
		t.Errorf("%d uniqueness keys for %d entries", uniq, len(es))
	}
	return len(es), len(evs)
}

func TestCreateEntry_Conflicts(t *testing.T) {
	ctx := context.Background()
	ev := store.AuditEvent{Actor: "admin", Action: "entry.create"}
	existing := testEntry("e1", "spiffe://td/a", "unix:uid:1", "unix:gid:2")
	tests := []struct {
		name    string
		e       store.Entry
		wantErr error
	}{
		{"same id", testEntry("e1", "spiffe://td/other", "unix:uid:9"), store.ErrAlreadyExists},
		{"same spiffe id and selectors", testEntry("e2", "spiffe://td/a", "unix:uid:1", "unix:gid:2"), store.ErrAlreadyExists},
		{"same spiffe id, fewer selectors", testEntry("e2", "spiffe://td/a", "unix:uid:1"), nil},
		{"same selectors, other spiffe id", testEntry("e2", "spiffe://td/b", "unix:uid:1", "unix:gid:2"), nil},
		// The store does not reorder selectors (the caller sorts them), so a
		// different order is a different set as far as it is concerned.
		{"selectors in another order", testEntry("e2", "spiffe://td/a", "unix:gid:2", "unix:uid:1"), nil},
		// Length-prefixing keeps field boundaries in the hash.
		{"shifted boundary", testEntry("e2", "spiffe://td/a", "unix:uid:1unix", "gid:2"), nil},
		{"empty id", testEntry("", "spiffe://td/c"), store.ErrInvalid},
		{"empty spiffe id", testEntry("e2", ""), store.ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newStore(t)
			if err := s.CreateEntry(ctx, existing, ev); err != nil {
				t.Fatal(err)
			}
			beforeE, beforeA := counts(t, s)
			err := s.CreateEntry(ctx, tc.e, ev)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("CreateEntry error %v, want %v", err, tc.wantErr)
			}
			afterE, afterA := counts(t, s)
			if tc.wantErr != nil {
				if afterE != beforeE || afterA != beforeA {
					t.Errorf("failed create changed the store: entries %d->%d, audit %d->%d", beforeE, afterE, beforeA, afterA)
				}
				got, err := s.GetEntry(ctx, "e1")
				if err != nil || !reflect.DeepEqual(got, existing) {
					t.Errorf("existing entry now %+v, %v", got, err)
				}
			} else if afterE != beforeE+1 || afterA != beforeA+1 {
				t.Errorf("create: entries %d->%d, audit %d->%d", beforeE, afterE, beforeA, afterA)
			}
		})
	}
}

func TestDeleteEntry(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	e := testEntry("e1", "spiffe://td/a", "unix:uid:1")
	if err := s.CreateEntry(ctx, e, store.AuditEvent{Action: "entry.create"}); err != nil {
		t.Fatal(err)
	}

	beforeE, beforeA := counts(t, s)
	if _, err := s.DeleteEntry(ctx, "nope", store.AuditEvent{Action: "entry.delete"}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("delete missing: %v, want ErrNotFound", err)
	}
	if afterE, afterA := counts(t, s); afterE != beforeE || afterA != beforeA {
		t.Errorf("failed delete changed the store: entries %d->%d, audit %d->%d", beforeE, afterE, beforeA, afterA)
	}

	got, err := s.DeleteEntry(ctx, "e1", store.AuditEvent{Action: "entry.delete", Target: "e1"})
	if err != nil || !reflect.DeepEqual(got, e) {
		t.Fatalf("DeleteEntry = %+v, %v", got, err)
	}
	if _, err := s.GetEntry(ctx, "e1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetEntry after delete: %v", err)
	}
	if n, a := counts(t, s); n != 0 || a != 2 {
		t.Errorf("after delete: %d entries, %d audit events; want 0, 2", n, a)
	}
	// The uniqueness claim went with it.
	if err := s.CreateEntry(ctx, testEntry("e2", "spiffe://td/a", "unix:uid:1"), store.AuditEvent{}); err != nil {
		t.Errorf("re-create after delete: %v", err)
	}
}

func TestListEntries_Paging(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	var want []string
	for i := range 25 {
		id := fmt.Sprintf("e%03d", (i*7)%25) // inserted out of order
		if err := s.CreateEntry(ctx, testEntry(id, "spiffe://td/"+id), store.AuditEvent{}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 25 {
		want = append(want, fmt.Sprintf("e%03d", i))
	}
	for _, size := range []int{0, 1, 7, 25, 100} {
		t.Run(fmt.Sprint("size=", size), func(t *testing.T) {
			var got []string
			tok := ""
			for pages := 0; ; pages++ {
				if pages > 30 {
					t.Fatal("paging does not terminate")
				}
				es, next, err := s.ListEntries(ctx, store.EntryQuery{PageSize: size, PageToken: tok})
				if err != nil {
					t.Fatal(err)
				}
				if size > 0 && len(es) > size {
					t.Fatalf("page of %d > %d", len(es), size)
				}
				for _, e := range es {
					got = append(got, e.ID)
				}
				if next == "" {
					break
				}
				tok = next
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %v", got)
			}
		})
	}
}

func TestListCAs_Order(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	for _, c := range []struct {
		id  string
		age time.Duration
	}{{"a", 3}, {"b", 1}, {"c", 2}, {"d", 1}} {
		if err := s.PutCA(ctx, store.CARecord{ID: c.id, CreatedAt: t0.Add(c.age * time.Hour)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Replace, not add.
	if err := s.PutCA(ctx, store.CARecord{ID: "c", State: store.CARetired, CreatedAt: t0.Add(2 * time.Hour)}, nil); err != nil {
		t.Fatal(err)
	}
	cas, err := s.ListCAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range cas {
		ids = append(ids, c.ID)
	}
	if want := []string{"b", "d", "c", "a"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("order %v, want %v", ids, want)
	}
	if cas[2].State != store.CARetired {
		t.Errorf("PutCA did not replace: %+v", cas[2])
	}
}

func TestOpen_FileModeAndReopen(t *testing.T) {
	s, path := newStore(t)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("store file mode %#o, want 0600", perm)
	}
	if di, _ := os.Stat(filepath.Dir(path)); di.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %#o, want 0700", di.Mode().Perm())
	}
	reopen(t, s, path)
}

func TestOpen_LockedInSameProcess(t *testing.T) {
	// flock locks belong to the open file description, so a second open(2)
	// of the same file conflicts even within one process (verified on Linux).
	_, path := newStore(t)
	timeout := 200 * time.Millisecond
	start := time.Now()
	s2, err := Open(path, Options{LockTimeout: timeout})
	elapsed := time.Since(start)
	if err == nil {
		_ = s2.Close()
		t.Fatal("second Open succeeded")
	}
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("error %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "in use by another meshid server") {
		t.Errorf("error %q does not explain itself", err)
	}
	if elapsed > timeout+time.Second {
		t.Errorf("second Open took %s with a %s timeout", elapsed, timeout)
	}
}

func TestOpen_LockedByOtherProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshid.db")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+path)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "locked\n" {
		_ = cmd.Wait()
		t.Fatalf("helper did not lock: %q %v; stderr: %s", line, err, stderr.String())
	}

	timeout := 200 * time.Millisecond
	start := time.Now()
	s, err := Open(path, Options{LockTimeout: timeout})
	elapsed := time.Since(start)
	if err == nil {
		_ = s.Close()
	}
	_ = stdin.Close() // let the helper go
	if werr := cmd.Wait(); werr != nil {
		t.Errorf("helper: %v; stderr: %s", werr, stderr.String())
	}
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("Open while another process holds the store: %v, want ErrLocked", err)
	}
	if elapsed > timeout+time.Second {
		t.Errorf("Open took %s with a %s timeout", elapsed, timeout)
	}

	// Released with the process: we can open it now.
	s = openT(t, path)
	_ = s.Close()
}

func TestOpen_Schema(t *testing.T) {
	tests := []struct {
		name    string
		mangle  func(tx *bolt.Tx) error
		wantErr []string
	}{
		{"newer version", func(tx *bolt.Tx) error { return putSchemaVersion(tx, 2) }, []string{"schema version 2", "supports 1"}},
		{"version missing", func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keySchema) }, []string{"missing"}},
		{"foreign bbolt file", func(tx *bolt.Tx) error {
			if err := tx.DeleteBucket(bucketMeta); err != nil {
				return err
			}
			_, err := tx.CreateBucket([]byte("someone else's"))
			return err
		}, []string{"not a meshid store"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, path := newStore(t)
			if err := s.db.Update(tc.mangle); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s2, err := Open(path, Options{})
			if err == nil {
				_ = s2.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, store.ErrSchema) {
				t.Fatalf("error %v, want ErrSchema", err)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			// The failed Open released the lock.
			s3, err := Open(path, Options{LockTimeout: 100 * time.Millisecond})
			if !errors.Is(err, store.ErrSchema) {
				t.Errorf("second Open: %v, want ErrSchema again", err)
			}
			if s3 != nil {
				_ = s3.Close()
			}
		})
	}
}

func TestClose(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	calls := map[string]func() error{
		"RecordSVID":  func() error { return s.RecordSVID(ctx, testSVID(1, t0)) },
		"ListSVIDs":   func() error { _, _, err := s.ListSVIDs(ctx, store.SVIDQuery{}); return err },
		"CreateEntry": func() error { return s.CreateEntry(ctx, testEntry("e", "spiffe://td/e"), store.AuditEvent{}) },
		"GetEntry":    func() error { _, err := s.GetEntry(ctx, "e"); return err },
		"ListAudit":   func() error { _, err := s.ListAudit(ctx, 0); return err },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, store.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}

// checkTwins asserts that svids and svids_by_expiry describe exactly the same
// rows and that the file passes bbolt's check; it returns the row count.
func checkTwins(t *testing.T, s *Store) int {
	t.Helper()
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	var n int
	err := s.db.View(func(tx *bolt.Tx) (err error) {
		n, err = checkInventory(tx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestRecordSVID_GroupCommit(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)
	const writers, perWriter = 64, 50
	var wg sync.WaitGroup
	errs := make(chan error, writers*perWriter)
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				n := w*perWriter + i
				if err := s.RecordSVID(ctx, testSVID(n, t0.Add(time.Duration(n%97)*time.Minute))); err != nil {
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

	s = reopen(t, s, path)
	if n := checkTwins(t, s); n != writers*perWriter {
		t.Fatalf("%d rows after reopen, want %d", n, writers*perWriter)
	}
	rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	seen := make(map[string]bool)
	for i, r := range rows {
		seen[r.Serial] = true
		if i > 0 && rows[i-1].NotAfter.After(r.NotAfter) {
			t.Fatalf("row %d out of expiry order", i)
		}
	}
	if len(seen) != writers*perWriter {
		t.Fatalf("%d distinct serials listed, want %d", len(seen), writers*perWriter)
	}
}

func TestRecordSVID_Errors(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	ok := testSVID(1, t0)
	if err := s.RecordSVID(ctx, ok); err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	tests := []struct {
		name    string
		ctx     context.Context
		rec     store.IssuedSVID
		wantErr error
	}{
		{"duplicate serial", ctx, testSVID(1, t0.Add(time.Hour)), store.ErrAlreadyExists},
		{"empty serial", ctx, store.IssuedSVID{NotAfter: t0}, store.ErrInvalid},
		{"zero NotAfter", ctx, store.IssuedSVID{Serial: "ab"}, store.ErrInvalid},
		{"long serial", ctx, store.IssuedSVID{Serial: strings.Repeat("a", maxSerialLen+1), NotAfter: t0}, store.ErrInvalid},
		{"cancelled context", cancelled, testSVID(2, t0), context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.RecordSVID(tc.ctx, tc.rec); !errors.Is(err, tc.wantErr) {
				t.Fatalf("RecordSVID: %v, want %v", err, tc.wantErr)
			}
			if n := checkTwins(t, s); n != 1 {
				t.Fatalf("%d rows, want only the first", n)
			}
		})
	}
}

// A caller whose context ends while its row waits in the queue gets the
// context error and its row is not written; rows already being committed
// are unaffected.
func TestRecordSVID_CancelWhileQueued(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)

	// Stall the committer at the start of its group.
	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	s.beforeCommit = func() { <-gate }
	// If the test fails while the committer is stalled, let it go before
	// the store's own cleanup waits for it, or the run hangs.
	t.Cleanup(release)
	first := make(chan error, 1)
	go func() { first <- s.RecordSVID(ctx, testSVID(1, t0)) }()
	// The committer counts a commit before it runs the hook: once the count
	// is 1 it holds row 1 and is stuck, so row 2 stays queued.
	waitFor(t, "committer to take row 1", func() bool { return s.commits.Load() == 1 })

	cctx, cancel := context.WithCancel(ctx)
	second := make(chan error, 1)
	go func() { second <- s.RecordSVID(cctx, testSVID(2, t0)) }()
	waitFor(t, "row 2 to be queued", func() bool {
		s.qmu.Lock()
		defer s.qmu.Unlock()
		return len(s.queue) == 1
	})
	cancel()
	select {
	case err := <-second:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled RecordSVID: %v", err)
		}
	case <-time.After(5 * time.Second):
		release()
		<-first
		<-second
		t.Fatal("cancelled RecordSVID did not return: its row was taken into a commit")
	}
	release()
	if err := <-first; err != nil {
		t.Fatalf("first RecordSVID: %v", err)
	}

	s = reopen(t, s, path)
	rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Serial != testSVID(1, t0).Serial {
		t.Fatalf("rows %+v, want only serial 1", rows)
	}
}

// waitFor polls cond: the committer has no event to wait on, and this only
// spins for as long as a goroutine takes to be scheduled.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestListSVIDs(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	// 30 rows, 3 per expiry instant, inserted in scrambled order.
	var all []store.IssuedSVID
	for i := range 30 {
		all = append(all, testSVID(i, t0.Add(time.Duration(i/3)*time.Hour)))
	}
	for i := range 30 {
		if err := s.RecordSVID(ctx, all[(i*11)%30]); err != nil {
			t.Fatal(err)
		}
	}
	serials := func(rows []store.IssuedSVID) []string {
		out := []string{}
		for _, r := range rows {
			out = append(out, r.Serial)
		}
		return out
	}
	tests := []struct {
		name string
		q    store.SVIDQuery
		want []store.IssuedSVID
	}{
		{"all", store.SVIDQuery{}, all},
		{"not expired at an expiry instant excludes it", store.SVIDQuery{NotExpiredAt: t0.Add(2 * time.Hour)}, all[9:]},
		{"not expired between instants", store.SVIDQuery{NotExpiredAt: t0.Add(150 * time.Minute)}, all[9:]},
		{"expiring before is inclusive", store.SVIDQuery{ExpiringBefore: t0.Add(2 * time.Hour)}, all[:9]},
		{"window", store.SVIDQuery{NotExpiredAt: t0.Add(time.Hour), ExpiringBefore: t0.Add(4*time.Hour - 1)}, all[6:12]},
		{"empty window", store.SVIDQuery{NotExpiredAt: t0.Add(5 * time.Hour), ExpiringBefore: t0.Add(time.Hour)}, nil},
		{"all expired", store.SVIDQuery{NotExpiredAt: t0.Add(100 * time.Hour)}, nil},
	}
	for _, tc := range tests {
		for _, size := range []int{0, 1, 4, 9, 30, 31} {
			t.Run(fmt.Sprintf("%s/size=%d", tc.name, size), func(t *testing.T) {
				var got []store.IssuedSVID
				q := tc.q
				q.PageSize = size
				for pages := 0; ; pages++ {
					if pages > 31 {
						t.Fatal("paging does not terminate")
					}
					rows, next, err := s.ListSVIDs(ctx, q)
					if err != nil {
						t.Fatal(err)
					}
					if size > 0 && len(rows) > size {
						t.Fatalf("page of %d > %d", len(rows), size)
					}
					if next != "" && len(rows) != size {
						t.Fatalf("short page (%d) with a next token", len(rows))
					}
					got = append(got, rows...)
					if next == "" {
						break
					}
					q.PageToken = next
				}
				if g, w := serials(got), serials(tc.want); !reflect.DeepEqual(g, w) {
					t.Errorf("got  %v\nwant %v", g, w)
				}
				if !reflect.DeepEqual(got, tc.want) && len(tc.want) > 0 {
					t.Errorf("rows differ from what was recorded")
				}
			})
		}
	}

	if _, _, err := s.ListSVIDs(ctx, store.SVIDQuery{PageToken: "zz"}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("malformed token: %v, want ErrInvalid", err)
	}
}

func TestPruneSVIDs(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		cutoff    time.Time
		wantPrune int
	}{
		{"nothing expired", t0.Add(-time.Hour), 0},
		{"cutoff at an expiry keeps it", t0.Add(3 * time.Hour), 6},
		{"cutoff just after", t0.Add(3*time.Hour + 1), 8},
		{"everything", t0.Add(100 * time.Hour), 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, path := newStore(t)
			for i := range 20 {
				// two rows per hour, hours 0..9
				if err := s.RecordSVID(ctx, testSVID(i, t0.Add(time.Duration(i/2)*time.Hour))); err != nil {
					t.Fatal(err)
				}
			}
			n, err := s.PruneSVIDs(ctx, tc.cutoff)
			if err != nil || n != tc.wantPrune {
				t.Fatalf("PruneSVIDs = %d, %v; want %d", n, err, tc.wantPrune)
			}
			s = reopen(t, s, path)
			if left := checkTwins(t, s); left != 20-tc.wantPrune {
				t.Fatalf("%d rows left, want %d", left, 20-tc.wantPrune)
			}
			rows, _, _ := s.ListSVIDs(ctx, store.SVIDQuery{})
			for _, r := range rows {
				if r.NotAfter.Before(tc.cutoff) {
					t.Errorf("row %s expiring %s survived cutoff %s", r.Serial, r.NotAfter, tc.cutoff)
				}
			}
		})
	}
}

func TestCodec_Corrupt(t *testing.T) {
	good := encodeSVID(&store.IssuedSVID{Serial: "ab", NotAfter: t0})
	for i := range len(good) {
		if _, err := decodeSVID(good[:i]); err == nil {
			t.Errorf("truncated to %d bytes decoded without error", i)
		}
	}
	if _, err := decodeSVID(append(good, 0)); err == nil {
		t.Error("trailing byte accepted")
	}
	bad := append([]byte{9}, good[1:]...)
	if _, err := decodeSVID(bad); err == nil || !strings.Contains(err.Error(), "version 9") {
		t.Errorf("unknown version: %v", err)
	}
}
