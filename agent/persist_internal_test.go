package agent

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/fakeclock"
)

// Writes of the persisted cache are coalesced on the agent's clock: a burst
// of changes (10,000 renewals at once) is one write a second later, not one
// each; a clean Close writes what is still pending.
func TestPersistWritesCoalesced(t *testing.T) {
	fc := fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	dir := t.TempDir()
	a, err := Open(Config{Server: "127.0.0.1:1", JoinToken: "mat_x", InsecureBootstrap: true, DataDir: dir,
		Socket: filepath.Join(dir, "s.sock"), Now: fc.Now, AfterFunc: fc.AfterFunc})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	path := filepath.Join(dir, CacheFile)
	// inode changes with every write: WriteFileAtomic renames a new file.
	inode := func() uint64 {
		fi, err := os.Stat(path)
		if err != nil {
			return 0
		}
		return fi.Sys().(*syscall.Stat_t).Ino
	}
	for range 10000 {
		a.persist.kick()
	}
	fc.Advance(persistInterval - time.Millisecond)
	if inode() != 0 {
		t.Fatal("written before the coalescing interval")
	}
	fc.Advance(time.Millisecond)
	first := inode()
	if first == 0 {
		t.Fatal("not written after the interval")
	}
	fc.Advance(10 * persistInterval)
	if inode() != first {
		t.Fatal("written again with no change")
	}
	for range 10000 {
		a.persist.kick()
	}
	fc.Advance(persistInterval)
	second := inode()
	if second == first {
		t.Fatal("a second burst was not written")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %s, want 0600", fi.Mode().Perm())
	}
	a.persist.kick()
	a.persist.close()
	if inode() == second {
		t.Fatal("Close did not write the pending change")
	}
}
