package boltstore

import (
	"bufio"
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// crashHelperEnv makes the test binary record rows until it is killed (see
// TestWAL_ReplayAfterKill9). Its value is "<mode>:<db path>".
const crashHelperEnv = "MESHID_BOLTSTORE_CRASH_HELPER"

// crashModes are the store configurations the crash helper runs with.
var crashModes = map[string]Options{
	// Nothing is folded before the kill: every acknowledged row is in the
	// WAL only.
	"wal-only": {walSegmentSize: testSegmentSize, foldInterval: time.Hour, foldRows: 1 << 30},
	// Tiny segments and constant folding: the kill lands among segment
	// switches, checkpoints and recycled segments.
	"folding": {walSegmentSize: 16 << 10, foldInterval: 2 * time.Millisecond, foldRows: 50},
}

// crashHelper records rows from 8 goroutines and prints "ok <serial>" for
// each acknowledged one, until it is killed.
func crashHelper(arg string) int {
	mode, path, _ := strings.Cut(arg, ":")
	opts, ok := crashModes[mode]
	if !ok {
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		return 2
	}
	s, err := Open(path, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	for range 8 {
		go func() {
			for {
				rec := randomSVID()
				if err := s.RecordSVID(context.Background(), rec); err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(1)
				}
				mu.Lock()
				// One write(2) per line: a line on the pipe is a row that was
				// acknowledged before the kill.
				fmt.Fprintf(out, "ok %s\n", rec.Serial)
				_ = out.Flush()
				mu.Unlock()
			}
		}()
	}
	select {}
}

func randomSVID() store.IssuedSVID {
	var b [16]byte
	_, _ = crand.Read(b[:])
	now := time.Now()
	return store.IssuedSVID{
		Serial:    hex.EncodeToString(b[:]),
		SpiffeID:  "spiffe://cluster.local/ns/crash/sa/test",
		NotBefore: now.Add(-time.Minute),
		NotAfter:  now.Add(time.Hour),
		Requester: "admin uid:0",
		CAID:      "ca-1",
		IssuedAt:  now,
	}
}

func walFiles(t testing.TB, path string) []string {
	t.Helper()
	files, err := filepath.Glob(path + ".wal.*")
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func walSeq(t testing.TB, file string) uint64 {
	t.Helper()
	seq, err := strconv.ParseUint(file[strings.LastIndexByte(file, '.')+1:], 16, 64)
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

// TestWAL_ReplayAfterKill9 SIGKILLs a process that is recording rows from 8
// goroutines, then checks that the store opens, is consistent, and holds
// every row the process acknowledged.
func TestWAL_ReplayAfterKill9(t *testing.T) {
	for _, mode := range []string{"wal-only", "folding"} {
		t.Run(mode, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "meshid.db")
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashHelperEnv+"="+mode+":"+path)
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			const killAfter = 3000
			var acked []string
			sc := bufio.NewScanner(stdout)
			var walAtKill []string
			for sc.Scan() {
				serial, ok := strings.CutPrefix(sc.Text(), "ok ")
				if !ok {
					continue
				}
				acked = append(acked, serial)
				if len(acked) == killAfter {
					walAtKill = walFiles(t, path)
					if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
						t.Fatal(err)
					}
				}
			}
			err = cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("helper ended with %v, want SIGKILL; %d rows acknowledged; stderr:\n%s", err, len(acked), stderr.String())
			}
			if len(acked) < killAfter {
				t.Fatalf("only %d rows acknowledged", len(acked))
			}
			if mode == "folding" {
				// ~200-byte rows in 16 KiB segments: dozens of switches. Recycling
				// keeps the files few, while their seqs keep growing.
				var maxSeq uint64
				for _, f := range walAtKill {
					maxSeq = max(maxSeq, walSeq(t, f))
				}
				if len(walAtKill) > 4 || maxSeq < 10 {
					t.Errorf("at the kill: wal files %v; want at most 4, with seqs past 10", walAtKill)
				}
			}

			s := openT(t, path)
			if err := s.Check(); err != nil {
				t.Fatalf("Check after kill -9: %v", err)
			}
			rows, _, err := s.ListSVIDs(context.Background(), store.SVIDQuery{})
			if err != nil {
				t.Fatal(err)
			}
			have := make(map[string]bool, len(rows))
			for _, r := range rows {
				have[r.Serial] = true
			}
			for _, serial := range acked {
				if !have[serial] {
					t.Fatalf("acknowledged serial %s is missing after kill -9 (%d rows, %d acknowledged)", serial, len(rows), len(acked))
				}
			}
			t.Logf("%d acknowledged, %d rows after replay", len(acked), len(rows))
			// The replay was folded and the log restarted: reopening finds
			// nothing more to add and nothing lost.
			s = reopen(t, s, path)
			if n := checkTwins(t, s); n != len(rows) {
				t.Fatalf("%d rows after a second reopen, want %d", n, len(rows))
			}
		})
	}
}

// walOnly opens a store whose folder never runs on its own, so that rows stay
// in the WAL until something reads the inventory or closes the store.
func walOnly(t testing.TB, path string, segSize int64) *Store {
	return openOpts(t, path, Options{Now: func() time.Time { return t0 }, walSegmentSize: segSize, foldInterval: time.Hour, foldRows: 1 << 30})
}

// crashCopy copies the db and its WAL files into a new directory, as a crash
// would leave them: nothing folded or closed. Folds and segment switches are
// held off during the copy; RecordSVID must not run concurrently.
func crashCopy(t *testing.T, s *Store) string {
	t.Helper()
	s.foldMu.Lock()
	defer s.foldMu.Unlock()
	s.rollMu.Lock()
	defer s.rollMu.Unlock()
	dst := filepath.Join(t.TempDir(), "meshid.db")
	for _, src := range append([]string{s.path}, walFiles(t, s.path)...) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst+strings.TrimPrefix(src, s.path), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func recordN(t testing.TB, s *Store, from, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 8 {
		wg.Go(func() {
			for i := from + w; i < from+n; i += 8 {
				if err := s.RecordSVID(context.Background(), testSVID(i, t0.Add(time.Duration(i)*time.Second))); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func rowCount(t testing.TB, s *Store) (n int, ckpt walPos) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketSVIDs).Stats().KeyN
		if v := tx.Bucket(bucketMeta).Get(keyWALCheckpoint); v != nil {
			var err error
			ckpt, err = decodePos(v)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n, ckpt
}

func serialSet(t testing.TB, s *Store) map[string]bool {
	t.Helper()
	rows, _, err := s.ListSVIDs(context.Background(), store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]bool, len(rows))
	for _, r := range rows {
		m[r.Serial] = true
	}
	return m
}

// A crash leaves a partial or garbage frame after the last acknowledged one.
// Opening ignores it: every acknowledged row is there, no error.
func TestWAL_TornTail(t *testing.T) {
	const rows = 500
	if got := testSVID(rows, t0); encodeSVID(&got)[len(encodeSVID(&got))-1] != 0 {
		t.Fatal("the \"all but the last byte\" case expects a frame ending in a zero byte")
	}
	path := filepath.Join(t.TempDir(), "meshid.db")
	s := walOnly(t, path, testSegmentSize)
	recordN(t, s, 0, rows)
	if n, _ := rowCount(t, s); n != 0 {
		t.Fatalf("%d rows folded already; the test needs them in the WAL only", n)
	}
	next := testSVID(rows, t0)
	frame := appendFrame(nil, s.active.seed, encodeSVID(&next))
	tail, activePath := s.tail, s.active.path

	tails := map[string][]byte{
		"nothing":                  nil,
		"garbage":                  []byte("\xde\xad\xbe\xef\x01\x02\x03\x04 not a frame at all"),
		"header only":              frame[:walHeaderLen],
		"half a frame":             frame[:len(frame)/2],
		"all but the last byte":    frame[:len(frame)-1], // a zero: the frame is whole
		"all but the last 2 bytes": frame[:len(frame)-2],
		"length past the segment":  binary.LittleEndian.AppendUint32(nil, 1<<30),
		"bad checksum": func() []byte {
			f := slices.Clone(frame)
			f[len(f)-3] ^= 0x40
			return f
		}(),
		"frame of another segment": appendFrame(nil, segSeed(s.active.seq+1), encodeSVID(&next)),
	}
	for name, junk := range tails {
		t.Run(name, func(t *testing.T) {
			cp := crashCopy(t, s)
			f, err := os.OpenFile(cp+strings.TrimPrefix(activePath, path), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(junk, tail); err != nil {
				t.Fatal(err)
			}
			_ = f.Close()
			// The torn row is replayed only if what is on disk happens to
			// be the whole frame (the missing bytes were zeros anyway):
			// then it was in fact written, and recording a row that was
			// never acknowledged is allowed.
			whole := name != "frame of another segment" && len(junk) <= len(frame) && bytes.Equal(junk, frame[:len(junk)]) &&
				!slices.ContainsFunc(frame[len(junk):], func(b byte) bool { return b != 0 })
			want := rows
			if whole {
				want++
			}
			s2 := openT(t, cp)
			if n := checkTwins(t, s2); n != want {
				t.Fatalf("%d rows after replay, want %d", n, want)
			}
			got := serialSet(t, s2)
			for i := range rows {
				if !got[testSVID(i, t0).Serial] {
					t.Fatalf("row %d missing", i)
				}
			}
			if got[next.Serial] != whole {
				t.Fatalf("torn row replayed = %v, want %v", got[next.Serial], whole)
			}
			// Replay restarted the log in fresh segments: the next rows go
			// in after all that, and survive another crash.
			recordN(t, s2, 1000, 10)
			cp2 := crashCopy(t, s2)
			s3 := openT(t, cp2)
			if n := checkTwins(t, s3); n != want+10 {
				t.Fatalf("%d rows after a second crash, want %d", n, want+10)
			}
		})
	}
}

// Check reads the WAL, so damage to an acknowledged frame does not go
// unnoticed even before a replay would have tripped over it.
func TestWAL_CheckDetectsDamage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshid.db")
	s := walOnly(t, path, testSegmentSize)
	recordN(t, s, 0, 50)
	if err := s.Check(); err != nil {
		t.Fatalf("Check on an intact store: %v", err)
	}
	s.wmu.Lock()
	f, mid := s.active.f, s.tail/2
	s.wmu.Unlock()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, mid); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, mid); err != nil {
		t.Fatal(err)
	}
	err := s.Check()
	if err == nil || !strings.Contains(err.Error(), "acknowledged") {
		t.Fatalf("Check after damaging a frame: %v, want an error", err)
	}
}

// Many rows through small segments: the folder moves them into bbolt on its
// own in big transactions, the checkpoint follows the tail, folded segments
// are recycled (so stale frames sit beyond the tail of reused files), and a
// crash afterwards replays exactly the rows that exist: pruned rows, whose
// frames are still in recycled files, stay pruned.
func TestWAL_FoldCheckpointRecycle(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "meshid.db")
	const segSize = 16 << 10 // ~80 rows
	s := openOpts(t, path, Options{Now: func() time.Time { return t0 }, walSegmentSize: segSize, foldInterval: 50 * time.Millisecond, foldRows: 500})
	firstSeq := s.active.seq

	const rows = 8000
	recordN(t, s, 0, rows)
	// No read: the folder alone must catch up with the tail.
	waitFor(t, "the folder to fold every row", func() bool {
		s.foldMu.Lock() // not in the middle of a fold
		defer s.foldMu.Unlock()
		s.pmu.Lock()
		defer s.pmu.Unlock()
		return len(s.pending) == 0
	})
	n, ckpt := rowCount(t, s)
	s.wmu.Lock()
	active, tail := s.active.seq, s.tail
	s.wmu.Unlock()
	if n != rows {
		t.Fatalf("%d rows in bbolt, want %d", n, rows)
	}
	if ckpt != (walPos{active, tail}) {
		t.Errorf("checkpoint %+v, want the tail %x:%d", ckpt, active, tail)
	}
	frameLen := walHeaderLen + len(encodeSVID(&store.IssuedSVID{Serial: testSVID(0, t0).Serial}))
	if switches := active - firstSeq; switches < uint64(rows*frameLen/segSize) {
		t.Errorf("only %d segment switches", switches)
	}
	if f := s.folds.Load(); f < 2 || f > rows/40 {
		t.Errorf("%d fold transactions for %d rows", f, rows)
	}
	waitFor(t, "folded segments to be recycled", func() bool { return len(walFiles(t, path)) <= 2 })

	// Prune every row, write a few more, then crash. The files beyond the
	// tail still hold frames of pruned rows from earlier lives of the
	// recycled segments; a replay that read them would resurrect those rows.
	if pruned, err := s.PruneSVIDs(ctx, t0.Add(100*rows*time.Second)); err != nil || pruned != rows {
		t.Fatalf("PruneSVIDs = %d, %v", pruned, err)
	}
	const more = 20
	recordN(t, s, rows, more)
	cp := crashCopy(t, s)

	s2 := openT(t, cp)
	if n := checkTwins(t, s2); n != more {
		t.Fatalf("%d rows after the crash, want %d", n, more)
	}
	got := serialSet(t, s2)
	for i := rows; i < rows+more; i++ {
		if !got[testSVID(i, t0).Serial] {
			t.Fatalf("row %d missing after the crash", i)
		}
	}
	if files := walFiles(t, cp); len(files) > 2 {
		t.Errorf("after replay: %d wal files, want at most 2 (active and spare)", len(files))
	}
}

// Duplicate serials are refused whether the first row is in the same group,
// pending in the WAL, or already folded into bbolt, and after a reopen.
func TestWAL_DuplicateSerials(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "meshid.db")
	s := walOnly(t, path, testSegmentSize)

	// Same group: many callers, one serial.
	var wg sync.WaitGroup
	var mu sync.Mutex
	results := map[string]int{}
	for i := range 16 {
		wg.Go(func() {
			err := s.RecordSVID(ctx, testSVID(1, t0.Add(time.Duration(i)*time.Minute)))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				results["ok"]++
			case errors.Is(err, store.ErrAlreadyExists):
				results["dup"]++
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if results["ok"] != 1 || results["dup"] != 15 {
		t.Fatalf("16 concurrent records of one serial: %v, want 1 ok and 15 duplicates", results)
	}
	if err := s.RecordSVID(ctx, testSVID(1, t0)); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("duplicate of a pending row: %v", err)
	}
	if err := s.fold(); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordSVID(ctx, testSVID(1, t0)); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("duplicate of a folded row: %v", err)
	}
	s = reopen(t, s, path)
	if err := s.RecordSVID(ctx, testSVID(1, t0)); !errors.Is(err, store.ErrAlreadyExists) {
		t.Fatalf("duplicate after reopen: %v", err)
	}
	if n := checkTwins(t, s); n != 1 {
		t.Fatalf("%d rows, want 1", n)
	}
	// A refused serial is not left claimed: pruning the row frees it.
	if _, err := s.PruneSVIDs(ctx, t0.Add(48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordSVID(ctx, testSVID(1, t0)); err != nil {
		t.Fatalf("record after prune: %v", err)
	}
}

// Close folds everything into bbolt, so the file alone, read without any WAL
// (as a meshid from before the WAL would), holds every row.
func TestWAL_CloseFolds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshid.db")
	s := walOnly(t, path, testSegmentSize)
	recordN(t, s, 0, 300)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		n, err := checkInventory(tx)
		if err == nil && n != 300 {
			err = fmt.Errorf("%d rows in the db file after Close, want 300", n)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The segment file is fully allocated up front and an append does not change
// its size.
func TestWAL_SegmentsPreallocated(t *testing.T) {
	s, path := newStore(t)
	recordN(t, s, 0, 100)
	for _, f := range walFiles(t, path) {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Size() != testSegmentSize || st.Blocks*512 < testSegmentSize {
			t.Errorf("%s: size %d, %d bytes allocated; want %d, fully allocated", f, fi.Size(), st.Blocks*512, testSegmentSize)
		}
		if perm := fi.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s: mode %#o, want 0600", f, perm)
		}
	}
}
