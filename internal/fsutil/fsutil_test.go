package fsutil

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// onlyEntries fails the test unless dir holds exactly want (no temporary
// files left behind).
func onlyEntries(t *testing.T, dir string, want ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if len(got) != len(want) {
		t.Fatalf("%s holds %v, want %v", dir, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s holds %v, want %v", dir, got, want)
		}
	}
}

// TestWriteFileAtomicNeverSeenHalfWritten replaces a 256 KiB file over and
// over while readers read it: each read is all of one version or all of
// the other.
func TestWriteFileAtomicNeverSeenHalfWritten(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	a := bytes.Repeat([]byte{'a'}, 256<<10)
	b := bytes.Repeat([]byte{'b'}, 256<<10)
	if err := WriteFileAtomic(path, a, 0o644); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var reads atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for !stop.Load() {
				got, err := os.ReadFile(path)
				if err != nil {
					t.Errorf("read: %v", err)
					return
				}
				if !bytes.Equal(got, a) && !bytes.Equal(got, b) {
					t.Errorf("read %d bytes that are neither version", len(got))
					return
				}
				reads.Add(1)
			}
		})
	}
	for i := range 40 {
		data := a
		if i%2 == 0 {
			data = b
		}
		if err := WriteFileAtomic(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if reads.Load() == 0 {
		t.Fatal("no read ran alongside the writes")
	}
	onlyEntries(t, dir, "f")
}

// TestWriteFileAtomicPermsExactWhateverTheUmask: a key written 0600 must
// not come out 0644 under umask 022 or 0 (a replaced file keeps the new
// mode, not the old one's), nor 0644 come out 0600 under umask 077 (Envoy
// in another group could not read its bundle).
func TestWriteFileAtomicPermsExactWhateverTheUmask(t *testing.T) {
	dir := t.TempDir()
	for _, umask := range []int{0, 0o022, 0o077, 0o777} {
		old := syscall.Umask(umask)
		for _, perm := range []fs.FileMode{0o600, 0o644, 0o640, 0o400} {
			path := filepath.Join(dir, "f")
			// Replace a file of another mode: the result has perm, not its.
			os.Remove(path)
			if err := os.WriteFile(path, []byte("old"), 0o666); err != nil {
				t.Fatal(err)
			}
			if err := WriteFileAtomic(path, []byte("new"), perm); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != perm {
				t.Errorf("umask %03o, perm %03o: file is %03o", umask, perm, fi.Mode().Perm())
			}
			xpath := filepath.Join(dir, "x")
			os.Remove(xpath)
			if err := WriteFileExclusive(xpath, []byte("new"), perm); err != nil {
				t.Fatal(err)
			}
			if fi, err := os.Stat(xpath); err != nil || fi.Mode().Perm() != perm {
				t.Errorf("exclusive: umask %03o, perm %03o: %v %v", umask, perm, fi, err)
			}
		}
		syscall.Umask(old)
	}
}

// TestWriteFileAtomicSyncsTheDirectoryAfterTheRename: the directory flush
// is what makes the new name survive a crash, so it must come after the
// rename has landed.
func TestWriteFileAtomicSyncsTheDirectoryAfterTheRename(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	var synced []string
	syncDirHook = func(d string) error {
		if got, err := os.ReadFile(path); err != nil || string(got) != "v1" {
			t.Errorf("directory synced before the rename landed: %q %v", got, err)
		}
		synced = append(synced, d)
		return SyncDir(d)
	}
	t.Cleanup(func() { syncDirHook = SyncDir })
	if err := WriteFileAtomic(path, []byte("v1"), 0o600); err != nil {
		t.Fatal(err)
	}
	if len(synced) != 1 || synced[0] != dir {
		t.Fatalf("directories synced: %v, want [%s]", synced, dir)
	}
	onlyEntries(t, dir, "f")
}

// TestWriteFileAtomicCleansUpOnError: when the rename fails (a directory
// is in the way) the error says so, the directory in the way is untouched
// and no temporary file is left.
func TestWriteFileAtomicCleansUpOnError(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(path, "keep"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("x"), 0o600); err == nil {
		t.Fatal("rename over a directory succeeded")
	}
	if fi, err := os.Stat(path); err != nil || !fi.IsDir() {
		t.Fatalf("the directory in the way changed: %v %v", fi, err)
	}
	onlyEntries(t, dir, "f")

	// A directory that does not exist: a clear error, nothing created.
	if err := WriteFileAtomic(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("write into a missing directory: %v, want ErrNotExist", err)
	}
	onlyEntries(t, dir, "f")
}

// TestWriteFileExclusiveRefusesAnExistingFile: the existing file keeps its
// content, the error wraps fs.ErrExist, and no temporary file is left.
func TestWriteFileExclusiveRefusesAnExistingFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k")
	if err := WriteFileExclusive(path, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileExclusive(path, []byte("second"), 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second create: %v, want ErrExist", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "first" {
		t.Fatalf("existing file became %q", got)
	}
	onlyEntries(t, dir, "k")
}
