package boltstore

// Folding the retired inventory WAL.
//
// Until this version RecordSVID made a row durable by appending it to a WAL
// segment (<db>.wal.<16 hex digits>) and moved it into bbolt later. The WAL
// is gone: a data dir written by such a version may still hold rows that
// exist only in its segments (after a crash, or a failed final fold), so
// Open reads them once with the old decoding rules, writes every valid row
// into bbolt in one transaction (fsynced by the commit), and only then
// removes the segment files. A crash in between is harmless: the segments
// are still there and the rows are written again, idempotently.
//
// The old format, kept here only to read it: a segment is a run of frames
// [len uint32][crc uint32][payload], little-endian, payload = encodeSVID;
// the checksum is CRC-32C seeded with the CRC-32C of the segment's seq
// (8 bytes, little-endian). A zero length, a length past the end of the file
// or a checksum mismatch ends the segment. meta/wal_checkpoint held the
// position (seq, offset; big-endian) after the last row already in bbolt.

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/meshid/meshid/internal/fsutil"
	bolt "go.etcd.io/bbolt"
)

const legacyFrameHeaderLen = 8

var (
	keyLegacyWALCheckpoint = []byte("wal_checkpoint")
	castagnoli             = crc32.MakeTable(crc32.Castagnoli)
)

type legacySegment struct {
	seq  uint64
	path string
}

func legacySegSeed(seq uint64) uint32 {
	return crc32.Checksum(binary.LittleEndian.AppendUint64(nil, seq), castagnoli)
}

// legacySegments lists the WAL segment files next to the db at path, oldest
// first.
func legacySegments(path string) ([]legacySegment, error) {
	dir, prefix := filepath.Dir(path), filepath.Base(path)+".wal."
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var segs []legacySegment
	for _, de := range des {
		name, ok := strings.CutPrefix(de.Name(), prefix)
		if !ok || len(name) != 16 || !de.Type().IsRegular() {
			continue
		}
		seq, err := strconv.ParseUint(name, 16, 64)
		if err != nil {
			continue
		}
		segs = append(segs, legacySegment{seq: seq, path: filepath.Join(dir, de.Name())})
	}
	slices.SortFunc(segs, func(a, b legacySegment) int { return cmp.Compare(a.seq, b.seq) })
	return segs, nil
}

// scanLegacySegment calls fn with every valid frame's payload (valid until fn
// returns) from offset from, and returns the offset after the last one.
func scanLegacySegment(f *os.File, seed uint32, from int64, fn func(payload []byte, off int64) error) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	limit := fi.Size()
	r := bufio.NewReaderSize(io.NewSectionReader(f, from, max(limit-from, 0)), 1<<20)
	off := from
	var (
		hdr     [legacyFrameHeaderLen]byte
		payload []byte
	)
	for limit-off >= legacyFrameHeaderLen {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil
			}
			return err
		}
		n := int64(binary.LittleEndian.Uint32(hdr[:4]))
		if n == 0 || n > limit-off-legacyFrameHeaderLen {
			return nil
		}
		payload = slices.Grow(payload[:0], int(n))[:n]
		if _, err := io.ReadFull(r, payload); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil
			}
			return err
		}
		if crc32.Update(seed, castagnoli, payload) != binary.LittleEndian.Uint32(hdr[4:]) {
			return nil
		}
		if err := fn(payload, off); err != nil {
			return err
		}
		off += legacyFrameHeaderLen + n
	}
	return nil
}

// foldLegacyWAL moves the rows of a retired WAL into bbolt and removes its
// segments; see the file comment. It runs in Open, under bbolt's file lock,
// before anything else writes.
func (s *Store) foldLegacyWAL() error {
	segs, err := legacySegments(s.path)
	if err != nil {
		return fmt.Errorf("fold legacy inventory wal: %w", err)
	}
	var ckpt []byte
	if err := s.db.View(func(tx *bolt.Tx) error {
		ckpt = bytes.Clone(tx.Bucket(bucketMeta).Get(keyLegacyWALCheckpoint))
		return nil
	}); err != nil {
		return fmt.Errorf("fold legacy inventory wal: %w", err)
	}
	if len(segs) == 0 && ckpt == nil {
		return nil
	}
	var ckptSeg uint64
	var ckptOff int64
	if ckpt != nil {
		if len(ckpt) != 16 {
			return fmt.Errorf("fold legacy inventory wal: malformed checkpoint %x", ckpt)
		}
		ckptSeg, ckptOff = binary.BigEndian.Uint64(ckpt), int64(binary.BigEndian.Uint64(ckpt[8:]))
	}

	type row struct{ serial, idxKey, val []byte }
	var rows []row
	for _, sg := range segs {
		if sg.seq < ckptSeg {
			continue // entirely in bbolt already
		}
		from := int64(0)
		if sg.seq == ckptSeg {
			from = ckptOff
		}
		f, err := os.Open(sg.path)
		if err != nil {
			return fmt.Errorf("fold legacy inventory wal: %w", err)
		}
		err = scanLegacySegment(f, legacySegSeed(sg.seq), from, func(p []byte, off int64) error {
			rec, err := decodeSVID(p)
			if err != nil {
				// The checksum matched, so this is what was written: refuse
				// to guess rather than drop an acknowledged row.
				return fmt.Errorf("segment %s at offset %d: %w", sg.path, off, err)
			}
			rows = append(rows, row{serial: []byte(rec.Serial), idxKey: expiryKey(rec.NotAfter, rec.Serial), val: bytes.Clone(p)})
			return nil
		})
		_ = f.Close()
		if err != nil {
			return fmt.Errorf("fold legacy inventory wal: %w", err)
		}
	}

	err = s.db.Update(func(tx *bolt.Tx) error {
		svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
		idx.FillPercent = expiryFillPercent
		for _, r := range rows {
			// A row folded before the crash has the same index key; one that
			// came back with another expiry drops its old index entry, so
			// the two buckets stay twins.
			if old := svids.Get(r.serial); old != nil && !bytes.Equal(old, r.idxKey[:expiryPrefixLen]) {
				if err := idx.Delete(append(bytes.Clone(old), r.serial...)); err != nil {
					return err
				}
			}
			if err := putInventoryRow(svids, idx, r.serial, r.idxKey, r.val); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Delete(keyLegacyWALCheckpoint)
	})
	if err != nil {
		return fmt.Errorf("fold legacy inventory wal: %w", err)
	}
	for _, sg := range segs {
		if err := os.Remove(sg.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("fold legacy inventory wal: remove folded segment: %w", err)
		}
	}
	if len(segs) > 0 {
		if err := fsutil.SyncDir(filepath.Dir(s.path)); err != nil {
			return fmt.Errorf("fold legacy inventory wal: sync dir: %w", err)
		}
	}
	s.log.Info("folded the retired inventory wal into the store", "rows", len(rows), "segments", len(segs))
	return nil
}
