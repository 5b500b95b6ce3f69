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
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/meshid/meshid/store"
)

// crashHelperEnv makes the test binary record rows until it is killed (see
// TestRecordSVID_Kill9). Its value is the db path.
const crashHelperEnv = "MESHID_BOLTSTORE_CRASH_HELPER"

// openHelperEnv makes the test binary open the store at its value and exit
// (see TestOpen_TruncatedFile).
const openHelperEnv = "MESHID_BOLTSTORE_OPEN_HELPER"

// crashHelper records rows from 8 goroutines and prints "ok <serial>" for
// each acknowledged one, until it is killed.
func crashHelper(path string) int {
	s, err := Open(path, Options{})
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

func openHelper(path string) int {
	s, err := Open(path, Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	_ = s.Close()
	return 0
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

// boltSerials reads the inventory's serials straight from the bbolt file,
// bypassing Store: what a crash leaves on disk, and all there is.
func boltSerials(t *testing.T, path string) map[string]bool {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	have := map[string]bool{}
	err = db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketSVIDs).ForEach(func(k, _ []byte) error {
			have[string(k)] = true
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return have
}

// TestRecordSVID_Kill9 SIGKILLs a process that is recording rows from 8
// goroutines: every row it acknowledged must be in the bbolt file itself, and
// there is no second file (the retired WAL once kept acknowledged rows
// outside bbolt, and a flipped byte there silently dropped them).
func TestRecordSVID_Kill9(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshid.db")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashHelperEnv+"="+path)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	const killAfter = 1500
	var acked []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		serial, ok := strings.CutPrefix(sc.Text(), "ok ")
		if !ok {
			continue
		}
		acked = append(acked, serial)
		if len(acked) == killAfter {
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
	others, err := filepath.Glob(path + "?*")
	if err != nil {
		t.Fatal(err)
	}
	if len(others) > 0 {
		t.Errorf("files beside the db after the kill: %v; the inventory must live in the db alone", others)
	}
	have := boltSerials(t, path)
	for _, serial := range acked {
		if !have[serial] {
			t.Fatalf("acknowledged serial %s is not in the bbolt file after kill -9 (%d rows, %d acknowledged)", serial, len(have), len(acked))
		}
	}
	s := openT(t, path)
	if n := checkTwins(t, s); n != len(have) {
		t.Fatalf("Check counts %d rows, the file holds %d", n, len(have))
	}
}

// legacyFrame encodes one frame of the retired WAL format, written out here
// from its specification rather than with the reader's code: len, then
// CRC-32C seeded with the CRC-32C of the segment seq, then the payload.
func legacyFrame(seq uint64, payload []byte) []byte {
	tab := crc32.MakeTable(crc32.Castagnoli)
	seed := crc32.Checksum(binary.LittleEndian.AppendUint64(nil, seq), tab)
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Update(seed, tab, payload))
	return append(b, payload...)
}

// TestOpen_FoldsLegacyWAL upgrades a data dir left by the WAL version after
// a crash: rows only in the segments appear in bbolt, rows before the
// checkpoint are not duplicated, a torn tail is not replayed, and the
// segments and the checkpoint are gone afterwards.
func TestOpen_FoldsLegacyWAL(t *testing.T) {
	ctx := context.Background()
	s, path := newStore(t)
	folded := testSVID(1, t0.Add(time.Hour)) // already in bbolt, before the checkpoint
	if err := s.RecordSVID(ctx, folded); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Segment 7: the folded row, then two acknowledged rows, then a torn
	// frame (its length runs past the file). Segment 8: one more row and a
	// frame whose checksum does not match (a stale frame of a recycled
	// segment). Segment 6 predates the checkpoint and holds junk.
	inWAL := []store.IssuedSVID{testSVID(2, t0.Add(2*time.Hour)), testSVID(3, t0.Add(3*time.Hour)), testSVID(4, t0.Add(4*time.Hour))}
	seg7 := legacyFrame(7, encodeSVID(&folded))
	ckptOff := len(seg7)
	seg7 = append(seg7, legacyFrame(7, encodeSVID(&inWAL[0]))...)
	seg7 = append(seg7, legacyFrame(7, encodeSVID(&inWAL[1]))...)
	torn := testSVID(99, t0.Add(time.Hour))
	seg7 = append(seg7, legacyFrame(7, encodeSVID(&torn))[:20]...)
	seg8 := legacyFrame(8, encodeSVID(&inWAL[2]))
	stale := testSVID(98, t0.Add(time.Hour))
	seg8 = append(seg8, legacyFrame(5, encodeSVID(&stale))...)
	seg8 = append(seg8, make([]byte, 4096)...) // the zeros after the tail
	for seq, data := range map[uint64][]byte{6: bytes.Repeat([]byte{0xff}, 100), 7: seg7, 8: seg8} {
		if err := os.WriteFile(fmt.Sprintf("%s.wal.%016x", path, seq), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		ckpt := binary.BigEndian.AppendUint64(nil, 7)
		return tx.Bucket(bucketMeta).Put(keyLegacyWALCheckpoint, binary.BigEndian.AppendUint64(ckpt, uint64(ckptOff)))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	s = openT(t, path)
	if segs, _ := filepath.Glob(path + ".wal.*"); len(segs) != 0 {
		t.Fatalf("segments left after the upgrade: %v", segs)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Straight from the file: the fold was committed, not only visible.
	have := boltSerials(t, path)
	want := map[string]bool{folded.Serial: true}
	for _, r := range inWAL {
		want[r.Serial] = true
	}
	if len(have) != len(want) {
		t.Fatalf("bbolt holds %d rows %v, want %d %v", len(have), have, len(want), want)
	}
	for serial := range want {
		if !have[serial] {
			t.Fatalf("row %s from the wal is missing after the upgrade", serial)
		}
	}
	db, err = bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	_ = db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyLegacyWALCheckpoint); v != nil {
			t.Errorf("wal checkpoint still in the meta bucket: %x", v)
		}
		return nil
	})
	_ = db.Close()

	s = openT(t, path)
	if n := checkTwins(t, s); n != len(want) {
		t.Fatalf("%d rows after reopening, want %d", n, len(want))
	}
	rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Serial == inWAL[1].Serial && r != inWAL[1] {
			t.Fatalf("folded row %+v, want %+v", r, inWAL[1])
		}
	}
}

// TestOpen_TruncatedFile truncates (or zeroes the freelist page of) a real
// store file and opens it in a child process: it must exit with a one-line
// error naming the file, not die of SIGBUS when bbolt touches a page past
// the end of the mapping, nor of bbolt's panic on a page it cannot read.
func TestOpen_TruncatedFile(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "meshid.db")
	s := openOpts(t, path, Options{UnsafeNoSync: true}) // only to fill it fast
	for i := range 3000 {
		if err := s.RecordSVID(ctx, testSVID(i, t0.Add(time.Duration(i)*time.Second))); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	meta, ok := parseBoltMeta(orig)
	if !ok {
		t.Fatal("cannot read the meta page of a fresh store")
	}
	// The freelist page named by meta 0; meta 1 may be newer and name
	// another, so zero both candidates.
	freelist0 := binary.LittleEndian.Uint64(orig[boltPageHeaderLen+32:])
	freelist1 := binary.LittleEndian.Uint64(orig[int(meta.pageSize)+boltPageHeaderLen+32:])
	damage := map[string]func() []byte{
		"half":    func() []byte { return orig[:fi.Size()/2] },
		"3 pages": func() []byte { return orig[:3*meta.pageSize] },
		"freelist zeroed": func() []byte {
			b := bytes.Clone(orig)
			for _, pg := range []uint64{freelist0, freelist1} {
				clear(b[pg*uint64(meta.pageSize) : (pg+1)*uint64(meta.pageSize)])
			}
			return b
		},
	}
	for name, damaged := range damage {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(path, damaged(), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), openHelperEnv+"="+path)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("opening the damaged file: %v, want exit 1; stderr:\n%s", err, stderr.String())
			}
			msg := strings.TrimSuffix(stderr.String(), "\n")
			t.Log(msg)
			if strings.Contains(msg, "\n") || !strings.Contains(msg, path) || !strings.Contains(msg, "restore it from a backup") {
				t.Fatalf("want one line naming %s as damaged, got:\n%s", path, msg)
			}
		})
	}
}

// mountTmpfs mounts a tmpfs of size bytes on a new directory: a real file
// system that really runs full.
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Skipf("cannot mount a tmpfs to fill (needs root / CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill writes a file until the file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		_, err := f.Write(buf)
		if errors.Is(err, syscall.ENOSPC) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	// Whatever is left is smaller than a block.
	for {
		if _, err := f.Write(buf[:512]); err != nil {
			break
		}
	}
}

// TestFullDisk runs the store on a tmpfs that fills up: the write that finds
// the disk full fails with ErrUnavailable and its row is not recorded, later
// writes are refused, reads and revocations keep working, and once space is
// freed the store takes writes again by itself.
func TestFullDisk(t *testing.T) {
	ctx := context.Background()
	dir := mountTmpfs(t, 8<<20)
	path := filepath.Join(dir, "meshid.db")
	s := openOpts(t, path, Options{Now: func() time.Time { return t0 }, probeInterval: 10 * time.Millisecond})
	var acked []store.IssuedSVID
	for i := range 100 {
		r := testSVID(i, t0.Add(time.Duration(i)*time.Second))
		if err := s.RecordSVID(ctx, r); err != nil {
			t.Fatal(err)
		}
		acked = append(acked, r)
	}
	fill(t, filepath.Join(dir, "filler"))

	// Rows fit in the file's free pages for a while; the first one that needs
	// the file to grow fails.
	var failed *store.IssuedSVID
	for i := 100; i < 100_000 && failed == nil; i++ {
		r := testSVID(i, t0.Add(time.Duration(i)*time.Second))
		switch err := s.RecordSVID(ctx, r); {
		case err == nil:
			acked = append(acked, r)
		case errors.Is(err, store.ErrUnavailable) && errors.Is(err, syscall.ENOSPC):
			failed = &r
		default:
			t.Fatalf("RecordSVID on a full disk: %v, want ErrUnavailable wrapping ENOSPC", err)
		}
	}
	if failed == nil {
		t.Fatal("100k rows recorded on a full 8 MiB tmpfs")
	}
	if err := s.Health(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Health after a failed commit: %v", err)
	}
	// Refused without trying; the prober keeps failing while the disk is full.
	next := testSVID(200_000, t0)
	if err := s.RecordSVID(ctx, next); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("RecordSVID while unhealthy: %v", err)
	}
	if err := s.CreateEntry(ctx, testEntry("e1", "spiffe://td/a", "unix:uid:1"), store.AuditEvent{Action: "entry.create"}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("CreateEntry while unhealthy: %v", err)
	}

	// Reads work, and show every acknowledged row and not the failed one.
	rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatalf("ListSVIDs on a full disk: %v", err)
	}
	have := map[string]bool{}
	for _, r := range rows {
		have[r.Serial] = true
	}
	for _, r := range acked {
		if !have[r.Serial] {
			t.Fatalf("acknowledged row %s missing", r.Serial)
		}
	}
	if have[failed.Serial] || have[next.Serial] {
		t.Fatal("a row whose RecordSVID failed is in the inventory")
	}
	// Revocation is not gated: it fits in the file's free pages.
	rev := store.RevokedSerial{Serial: acked[0].Serial, CAID: "ca-1", SpiffeID: acked[0].SpiffeID, NotAfter: acked[0].NotAfter, RevokedAt: t0}
	if err := s.RevokeSerials(ctx, []store.RevokedSerial{rev}, store.AuditEvent{Action: "svid.revoke"}); err != nil {
		t.Fatalf("RevokeSerials on a full disk: %v", err)
	}
	if got, err := s.ListRevoked(ctx); err != nil || len(got) != 1 {
		t.Fatalf("ListRevoked: %v %v", got, err)
	}
	if err := s.Health(); err == nil {
		t.Fatal("healthy again while the disk is still full")
	}

	if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the store to take writes again", func() bool { return s.Health() == nil })
	if err := s.RecordSVID(ctx, *failed); err != nil {
		t.Fatalf("RecordSVID after space was freed: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	have = boltSerials(t, path)
	if !have[failed.Serial] || len(have) != len(acked)+1 {
		t.Fatalf("after recovery the file holds %d rows (retried row present: %v), want %d", len(have), have[failed.Serial], len(acked)+1)
	}
}

// An I/O error other than a full disk (EIO from fsync) is fail-stop until
// restart: after a failed fsync the page cache may hold what the disk lost,
// so no probe may declare the store healthy. Writes that add state are
// refused, revocations are still attempted, reads work. (A real EIO needs a
// failing device; the failure is injected where a commit reports it.)
func TestWriteFailure_EIOIsFailStop(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t)
	r := testSVID(1, t0.Add(time.Hour))
	if err := s.RecordSVID(ctx, r); err != nil {
		t.Fatal(err)
	}
	cause := &os.PathError{Op: "sync", Path: s.path, Err: syscall.EIO}
	if err := s.commitFailed("record svid: group commit", cause); !errors.Is(err, store.ErrUnavailable) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("commitFailed: %v", err)
	}
	err := s.Health()
	if !errors.Is(err, store.ErrUnavailable) || !strings.Contains(err.Error(), "restart the server") {
		t.Fatalf("Health after EIO: %v", err)
	}
	s.hmu.Lock()
	recoverable := s.health.recoverable
	s.hmu.Unlock()
	if recoverable {
		t.Fatal("EIO marked recoverable: a probe could bring back a store whose page cache lied")
	}
	if err := s.RecordSVID(ctx, testSVID(2, t0.Add(time.Hour))); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("RecordSVID after EIO: %v", err)
	}
	if err := s.CreateToken(ctx, store.JoinToken{Hash: "ab", SpiffeID: "spiffe://td/x", ExpiresAt: t0.Add(time.Hour)}, store.AuditEvent{Action: "token.create"}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("CreateToken after EIO: %v", err)
	}
	rev := store.RevokedSerial{Serial: r.Serial, CAID: r.CAID, SpiffeID: r.SpiffeID, NotAfter: r.NotAfter, RevokedAt: t0}
	if err := s.RevokeSerials(ctx, []store.RevokedSerial{rev}, store.AuditEvent{Action: "svid.revoke"}); err != nil {
		t.Fatalf("RevokeSerials after EIO (the disk here is fine): %v", err)
	}
	if rows, _, err := s.ListSVIDs(ctx, store.SVIDQuery{}); err != nil || len(rows) != 1 {
		t.Fatalf("ListSVIDs after EIO: %d rows, %v", len(rows), err)
	}
	if s.Health() == nil {
		t.Fatal("a successful ungated write cleared the fail-stop state")
	}
	// A full disk, by contrast, is probed and clears once a write commits
	// (this disk has room, so the first probe does).
	s2 := openOpts(t, filepath.Join(t.TempDir(), "meshid.db"), Options{probeInterval: time.Millisecond})
	_ = s2.commitFailed("append audit", &os.PathError{Op: "write", Path: s2.path, Err: syscall.ENOSPC})
	waitFor(t, "the probe to clear a full-disk failure", func() bool { return s2.Health() == nil })
	if err := s2.RecordSVID(ctx, r); err != nil {
		t.Fatalf("RecordSVID after recovery: %v", err)
	}
}
