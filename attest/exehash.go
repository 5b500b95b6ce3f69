package attest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// MaxExeHashSize bounds the executables whose SHA-256 is computed for the
// unix:sha256 selector: a caller running a bigger one gets no such
// selector (so no entry keyed on it matches) rather than costing the
// server a long read on every new file.
const MaxExeHashSize = 256 << 20

// maxExeCache bounds the remembered digests; one per distinct executable
// file, so a host rarely comes near it.
const maxExeCache = 4096

// exeKey identifies one version of one file. The ctime is there because
// the owner of a file can set its mtime back after rewriting it, but not
// its ctime: a file rewritten in place is never taken for the old one.
type exeKey struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

// maxExeHashing bounds the digests computed at once: a local user who
// keeps making new big executables (each touch is a new version) can make
// the server hash, but not on every core.
const maxExeHashing = 2

// exeHasher computes and remembers executables' SHA-256, once per file
// version however many callers run it at once.
type exeHasher struct {
	sem    chan struct{} // one token per digest being computed
	mu     sync.Mutex
	cache  map[exeKey]*exeSum
	hashes int // digests computed, for tests
}

type exeSum struct {
	done chan struct{} // closed once sum and err are set
	sum  string
	err  error
}

func newExeHasher() *exeHasher {
	return &exeHasher{sem: make(chan struct{}, maxExeHashing), cache: map[exeKey]*exeSum{}}
}

// sum returns the SHA-256 (lowercase hex) of the file exe (a
// /proc/<pid>/exe link). It is read through the link, which opens the
// very file the process runs even if another has been put at its path
// since.
func (h *exeHasher) sum(exe string) (string, error) {
	// Plain system calls: a cache hit, the usual case, then costs three.
	fd, err := unix.Open(exe, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", &os.PathError{Op: "open", Path: exe, Err: err}
	}
	closeFD := true
	defer func() {
		if closeFD {
			unix.Close(fd)
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", exe, err)
	}
	if st.Size > MaxExeHashSize {
		return "", fmt.Errorf("executable is %d bytes, over the %d bytes hashed", st.Size, MaxExeHashSize)
	}
	k := exeKey{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
	h.mu.Lock()
	e, ok := h.cache[k]
	if !ok {
		if len(h.cache) >= maxExeCache {
			h.evictLocked()
		}
		e = &exeSum{done: make(chan struct{})}
		h.cache[k] = e
	}
	h.mu.Unlock()
	if ok {
		<-e.done
		return e.sum, e.err
	}
	f := os.NewFile(uintptr(fd), exe)
	closeFD = false
	defer f.Close()
	h.sem <- struct{}{}
	e.sum, e.err = hashFile(f, st.Size)
	<-h.sem
	close(e.done)
	h.mu.Lock()
	h.hashes++
	if e.err != nil && h.cache[k] == e {
		delete(h.cache, k) // the next caller tries again
	}
	h.mu.Unlock()
	return e.sum, e.err
}

// evictLocked drops every finished digest: simpler than an LRU, and a
// full cache means the host churns through executables anyway. h.mu is
// held.
func (h *exeHasher) evictLocked() {
	for k, e := range h.cache {
		select {
		case <-e.done:
			delete(h.cache, k)
		default:
		}
	}
}

func hashFile(f *os.File, size int64) (string, error) {
	d := sha256.New()
	n, err := io.Copy(d, io.LimitReader(f, size+1))
	if err != nil {
		return "", fmt.Errorf("read executable: %w", err)
	}
	if n != size {
		// Changed while read (it cannot be while it runs: ETXTBSY).
		return "", errors.New("executable changed size while it was hashed")
	}
	return hex.EncodeToString(d.Sum(nil)), nil
}
