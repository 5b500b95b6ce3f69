package boltstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"os"
)

// bbolt's on-disk meta page, as far as checkFileSize needs it: a 16-byte page
// header, then magic, version, pageSize, flags (uint32 each), the root
// bucket (root pgid, sequence), the freelist pgid, the high-water pgid, the
// txid (uint64 each) and an FNV-64a checksum of everything before it. bbolt
// writes it in host byte order; meshid runs on little-endian hosts only
// (amd64, arm64), and a file from elsewhere fails the checksum and is left
// to bbolt's own error.
const (
	boltPageHeaderLen = 16
	boltMetaSumOffset = 56 // offset of the checksum within the meta
	boltMetaLen       = boltMetaSumOffset + 8
	boltMagic         = 0xED0CDAED
	boltVersion       = 2
)

type boltMeta struct {
	pageSize uint32
	pgid     uint64 // pages in use: the file must hold pgid*pageSize bytes
	txid     uint64
}

func parseBoltMeta(page []byte) (boltMeta, bool) {
	if len(page) < boltPageHeaderLen+boltMetaLen {
		return boltMeta{}, false
	}
	m := page[boltPageHeaderLen : boltPageHeaderLen+boltMetaLen]
	le := binary.LittleEndian
	h := fnv.New64a()
	_, _ = h.Write(m[:boltMetaSumOffset])
	if le.Uint32(m[0:]) != boltMagic || le.Uint32(m[4:]) != boltVersion || h.Sum64() != le.Uint64(m[boltMetaSumOffset:]) {
		return boltMeta{}, false
	}
	return boltMeta{pageSize: le.Uint32(m[8:]), pgid: le.Uint64(m[40:]), txid: le.Uint64(m[48:])}, true
}

// checkFileSize refuses a store file shorter than its newest valid meta page
// says it is. bbolt maps the file and dereferences the pages the meta names
// (the freelist, the root bucket) through the mapping; past the end of a
// truncated file that access is a SIGBUS that kills the process with a
// stack trace instead of an error. A missing or empty file is left to bbolt
// (it creates one), and so is a file whose meta pages are both invalid
// (bbolt reports that itself without touching the mapping).
func checkFileSize(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open store %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open store %s: %w", path, err)
	}
	size := fi.Size()
	if size == 0 || !fi.Mode().IsRegular() {
		return nil
	}
	buf := make([]byte, boltPageHeaderLen+boltMetaLen)
	read := func(off int64) (boltMeta, bool) {
		n, err := f.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return boltMeta{}, false
		}
		return parseBoltMeta(buf[:n])
	}
	// Meta 0 is at offset 0, meta 1 one page further; if meta 0 is damaged
	// its page size is unknown, so try the sizes bbolt could have used.
	best, ok := read(0)
	offsets := []int64{4096, 16384, 65536}
	if ok {
		offsets = []int64{int64(best.pageSize)}
	}
	for _, off := range offsets {
		if m, ok1 := read(off); ok1 && int64(m.pageSize) == off && (!ok || m.txid > best.txid) {
			best, ok = m, true
		}
	}
	if !ok || best.pageSize == 0 {
		return nil
	}
	if need := int64(best.pgid) * int64(best.pageSize); need > size || need/int64(best.pageSize) != int64(best.pgid) {
		return fmt.Errorf("store file %s is truncated or damaged: it is %d bytes, but its last commit (txid %d) uses %d pages of %d bytes (%d bytes); restore it from a backup",
			path, size, best.txid, best.pgid, best.pageSize, need)
	}
	return nil
}
