package boltstore

// The inventory write-ahead log.
//
// RecordSVID is on the issuance path and must be durable before it returns.
// A bbolt commit is an expensive durability point: it writes the dirty pages,
// fdatasyncs, writes the meta page and fdatasyncs again, ~0.8-1 ms under load
// here. The WAL makes RecordSVID's durability point a single pwrite plus a
// single fdatasync of an append-only file (~0.35 ms), and moves the rows into
// bbolt later, many thousands per transaction ("folding").
//
// Files. Segments live next to the db as <db>.wal.<seq>, seq a 16-digit hex
// number that only grows. Each is created at a fixed size (walSegmentSize,
// 64 MiB) by writing zeros and fsyncing once. That matters for latency:
// appending to a file (or writing into fallocate'd "unwritten" extents)
// changes its size or extent map, and fdatasync must then commit that
// metadata through the filesystem journal, a second device flush on every
// commit. Overwriting blocks that are already allocated and written changes
// no metadata that fdatasync has to persist (the mtime is not needed to read
// the data back), so each group costs one data write and one cache flush.
//
// Records. A segment is a run of frames [len uint32][crc uint32][payload],
// little-endian, payload = encodeSVID. The checksum is CRC-32C over the
// segment's seq (8 bytes, little-endian) followed by the payload: a segment
// file is recycled (renamed to a new seq and overwritten from offset 0)
// without being zeroed again, and seeding the checksum with the seq makes the
// previous incarnation's frames beyond the new tail fail the check instead of
// being replayed. A zero length, a length running past the segment, or a
// checksum mismatch is the end of the log: that is a torn write from a crash
// (its row was never acknowledged) or the zeros/stale data after the tail.
// A frame never straddles two segments; a group that does not fit in what is
// left of the active segment goes to the next one whole.
//
// Group commit. The committer goroutine (boltstore.go) takes every queued
// row, checks it for a duplicate serial, writes the group's frames with one
// pwrite at the tail and makes them durable with one fdatasync, appends the
// rows to the in-memory pending list and only then answers the callers.
//
// Folding. The folder goroutine moves pending rows into the svids and
// svids_by_expiry buckets every foldInterval (1 s), or as soon as foldRows
// (5,000) are pending, and records in the meta bucket, in the same bbolt transaction,
// the WAL position after the last folded row (the checkpoint). A sealed
// segment whose rows are all behind the checkpoint is recycled as the next
// spare segment (or deleted if there already is one), so a busy server cycles
// through two files.
//
// Reads. ListSVIDs, PruneSVIDs and Check first fold whatever is pending,
// synchronously, then read bbolt alone: every acknowledged row is in the
// pending list, so it is in bbolt when the read begins. This is simpler than
// merging the pending rows into paged, filtered listings, and those calls
// are rare (admin listings, the pruner, consistency checks) next to
// RecordSVID; a fold of what accumulates in at most foldInterval costs a few
// tens of milliseconds.
//
// Open replays every segment from the checkpoint into bbolt (in big
// transactions that also advance the checkpoint), so it is idempotent: a row
// replayed twice is simply written again. Every existing segment is then
// recycled and the log starts over in a segment with a seq larger than any
// seen before; nothing is ever appended after a torn tail.
//
// Compatibility: the bucket layout is unchanged and so is SchemaVersion. A
// file last closed cleanly (Close folds everything) is readable by a meshid
// that knows nothing of the WAL; after a crash, open it with a WAL-aware
// meshid first, or the rows still in the WAL are not seen.
//
// Power loss: a group's pwrite rewrites the partially filled last page of the
// previous group. Like most WALs this relies on the device writing a sector
// atomically, so that rewriting a sector never destroys what it held before;
// process crashes (kill -9) do not depend on it, the page cache survives.

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
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

const (
	// DefaultWALSegmentSize is the size every WAL segment is created with.
	// At ~200 bytes a row that is ~300k rows, about a minute of sustained
	// issuance at full speed, between two segment switches.
	DefaultWALSegmentSize = 64 << 20

	walHeaderLen = 8

	// defaultFoldInterval and defaultFoldRows bound how long and how many
	// rows stay in the WAL alone before the folder moves them into bbolt.
	// Bigger folds are cheaper per row: serials are random, so a fold
	// rewrites about one leaf of the serial bucket per row until it has
	// touched most of them. With 8 clients on 2 cores, folding every 1 s
	// instead of every 100 ms took ~25 us of server CPU off each SVID
	// (+10% SVIDs/s end to end). The price is paid by readers, which fold
	// synchronously: at most ~1 s of rows (a few tens of ms of folding).
	defaultFoldInterval = time.Second
	defaultFoldRows     = 5000
	// foldTxRows caps one fold (or replay) transaction, so that a backlog
	// is folded in several bounded transactions rather than one huge one.
	foldTxRows = 50_000
	// maxPendingRows is the backpressure point: when the folder falls this
	// far behind (bbolt failing or far slower than the disk), the committer
	// waits for it rather than letting memory grow without bound.
	maxPendingRows = 256 << 10
)

var (
	keyWALCheckpoint = []byte("wal_checkpoint")
	castagnoli       = crc32.MakeTable(crc32.Castagnoli)
)

// walPos is a position in the log: the offset in segment seg.
type walPos struct {
	seg uint64
	off int64
}

func (p walPos) covers(q walPos) bool {
	return p.seg > q.seg || (p.seg == q.seg && p.off >= q.off)
}

func encodePos(p walPos) []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 16), p.seg)
	return binary.BigEndian.AppendUint64(b, uint64(p.off))
}

func decodePos(v []byte) (walPos, error) {
	if len(v) != 16 {
		return walPos{}, fmt.Errorf("malformed wal checkpoint %x", v)
	}
	return walPos{seg: binary.BigEndian.Uint64(v), off: int64(binary.BigEndian.Uint64(v[8:]))}, nil
}

// segment is one open WAL file.
type segment struct {
	seq  uint64
	path string
	f    *os.File
	seed uint32 // CRC-32C of seq: the checksum's starting value
	end  int64  // once sealed: the offset after its last frame
}

func segSeed(seq uint64) uint32 {
	return crc32.Checksum(binary.LittleEndian.AppendUint64(nil, seq), castagnoli)
}

func (s *Store) segPath(seq uint64) string { return fmt.Sprintf("%s.wal.%016x", s.path, seq) }

// walRow is an acknowledged row that is in the WAL and not yet in bbolt.
type walRow struct {
	serial []byte
	idxKey []byte
	val    []byte
	end    walPos // the position after its frame
}

func appendFrame(b []byte, seed uint32, payload []byte) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Update(seed, castagnoli, payload))
	return append(b, payload...)
}

// scanSegment reads the frames of f from offset from up to limit and calls fn
// with each payload (valid until fn returns) and the offset after it. It
// returns the offset after the last valid frame; an invalid frame is the end
// of the log, not an error. Only I/O errors and fn's errors are returned.
func scanSegment(f *os.File, seed uint32, from, limit int64, fn func(payload []byte, end int64) error) (int64, error) {
	r := bufio.NewReaderSize(io.NewSectionReader(f, from, max(limit-from, 0)), 1<<20)
	off := from
	var (
		hdr     [walHeaderLen]byte
		payload []byte
	)
	for limit-off >= walHeaderLen {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return off, nil // the file is shorter than limit
			}
			return off, err
		}
		n := int64(binary.LittleEndian.Uint32(hdr[:4]))
		if n == 0 || n > limit-off-walHeaderLen {
			return off, nil
		}
		payload = slices.Grow(payload[:0], int(n))[:n]
		if _, err := io.ReadFull(r, payload); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return off, nil
			}
			return off, err
		}
		if crc32.Update(seed, castagnoli, payload) != binary.LittleEndian.Uint32(hdr[4:]) {
			return off, nil
		}
		off += walHeaderLen + n
		if fn != nil {
			if err := fn(payload, off); err != nil {
				return off, err
			}
		}
	}
	return off, nil
}

// createSegment makes a new segment file of s.segSize bytes, zero-filled and
// fsynced (see the package comment on why zeros and not fallocate or a
// sparse file), and makes its name durable before anything is written to it.
func (s *Store) createSegment(seq uint64) (*segment, error) {
	path := s.segPath(seq)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create wal segment: %w", err)
	}
	fail := func(err error) (*segment, error) {
		_ = f.Close()
		_ = os.Remove(path)
		return nil, fmt.Errorf("create wal segment %s: %w", path, err)
	}
	zeros := make([]byte, min(s.segSize, 1<<20))
	for off := int64(0); off < s.segSize; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), s.segSize-off)], off); err != nil {
			return fail(err)
		}
	}
	// A full fsync, once: it commits the size and the block allocation, so
	// that the fdatasyncs of later appends have no metadata to commit.
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fail(err)
	}
	s.log.Debug("wal segment created", "path", path)
	return &segment{seq: seq, path: path, f: f, seed: segSeed(seq)}, nil
}

// renameSegment gives a fully folded segment a new seq, to be overwritten
// from offset 0. The caller makes the new name durable (syncDir) before the
// segment is written to.
func (s *Store) renameSegment(sg *segment, seq uint64) error {
	path := s.segPath(seq)
	if err := os.Rename(sg.path, path); err != nil {
		return fmt.Errorf("recycle wal segment: %w", err)
	}
	sg.seq, sg.path, sg.seed, sg.end = seq, path, segSeed(seq), 0
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// ---- open and replay ----

// openWAL replays the log into bbolt and sets up the active and spare
// segments. It runs inside Open, before the goroutines start.
func (s *Store) openWAL() (err error) {
	var segs []*segment
	defer func() {
		if err != nil {
			for _, sg := range segs {
				_ = sg.f.Close()
			}
		}
	}()
	dir, base := filepath.Dir(s.path), filepath.Base(s.path)+".wal."
	des, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("open wal: %w", err)
	}
	for _, de := range des {
		name, ok := strings.CutPrefix(de.Name(), base)
		if !ok || len(name) != 16 || !de.Type().IsRegular() {
			continue
		}
		seq, perr := strconv.ParseUint(name, 16, 64)
		if perr != nil {
			continue
		}
		path := filepath.Join(dir, de.Name())
		f, oerr := os.OpenFile(path, os.O_RDWR, 0)
		if oerr != nil {
			return fmt.Errorf("open wal segment: %w", oerr)
		}
		segs = append(segs, &segment{seq: seq, path: path, f: f, seed: segSeed(seq)})
	}
	slices.SortFunc(segs, func(a, b *segment) int { return cmp.Compare(a.seq, b.seq) })

	var ckpt walPos
	err = s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(keyWALCheckpoint)
		if v == nil {
			return nil
		}
		var derr error
		ckpt, derr = decodePos(v)
		return derr
	})
	if err != nil {
		return fmt.Errorf("open wal: %w", err)
	}
	replayed, err := s.replay(segs, ckpt)
	if err != nil {
		return err
	}

	// Everything is in bbolt now, so every file is free. The log restarts in
	// a seq above all that was ever used: above the checkpoint's, and above
	// every file name, including files recycled in an earlier life whose
	// rename may or may not have reached the disk.
	next := ckpt.seg + 1
	if len(segs) > 0 {
		next = max(next, segs[len(segs)-1].seq+1)
	}
	var reuse []*segment
	for _, sg := range segs {
		fi, serr := sg.f.Stat()
		if serr == nil && fi.Size() == s.segSize && len(reuse) < 2 {
			reuse = append(reuse, sg)
			continue
		}
		_ = sg.f.Close()
		if rerr := os.Remove(sg.path); rerr != nil {
			s.log.Warn("remove wal segment", "path", sg.path, "err", rerr)
		}
	}
	segs = reuse
	for i, sg := range reuse {
		if err := s.renameSegment(sg, next+uint64(i)); err != nil {
			return err
		}
	}
	if len(reuse) > 0 {
		if err := syncDir(dir); err != nil {
			return fmt.Errorf("open wal: sync dir: %w", err)
		}
	}
	switch len(reuse) {
	case 0:
		if s.active, err = s.createSegment(next); err != nil {
			return err
		}
	case 1:
		s.active = reuse[0]
	default:
		s.active, s.spare = reuse[0], reuse[1]
	}
	s.ckpt = ckpt
	if replayed > 0 {
		s.log.Info("replayed inventory wal", "rows", replayed, "checkpoint_segment", ckpt.seg)
	}
	return nil
}

// replay folds every frame after the checkpoint into bbolt.
func (s *Store) replay(segs []*segment, ckpt walPos) (int, error) {
	var (
		rows  []walRow
		total int
	)
	flush := func() error {
		if len(rows) == 0 {
			return nil
		}
		if err := s.db.Update(func(tx *bolt.Tx) error { return foldInto(tx, rows) }); err != nil {
			return fmt.Errorf("replay wal: %w", err)
		}
		total += len(rows)
		rows = rows[:0]
		return nil
	}
	for _, sg := range segs {
		if sg.seq < ckpt.seg {
			continue // folded
		}
		from := int64(0)
		if sg.seq == ckpt.seg {
			from = ckpt.off
		}
		fi, err := sg.f.Stat()
		if err != nil {
			return 0, fmt.Errorf("replay wal: %w", err)
		}
		_, err = scanSegment(sg.f, sg.seed, from, fi.Size(), func(p []byte, end int64) error {
			rec, err := decodeSVID(p)
			if err != nil {
				// The checksum matched, so this is what was written: a format
				// this binary does not know, not a torn write.
				return fmt.Errorf("wal segment %s at offset %d: %w", sg.path, end-int64(len(p))-walHeaderLen, err)
			}
			rows = append(rows, walRow{
				serial: []byte(rec.Serial),
				idxKey: expiryKey(rec.NotAfter, rec.Serial),
				val:    bytes.Clone(p),
				end:    walPos{sg.seq, end},
			})
			if len(rows) >= foldTxRows {
				return flush()
			}
			return nil
		})
		if err != nil {
			return 0, fmt.Errorf("replay wal: %w", err)
		}
	}
	return total, flush()
}

// foldInto writes rows into the inventory and moves the checkpoint past the
// last one, in tx.
func foldInto(tx *bolt.Tx, rows []walRow) error {
	svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
	idx.FillPercent = expiryFillPercent
	for _, r := range rows {
		// Normally absent (RecordSVID refuses duplicates, and a replayed row
		// has the same index key as its earlier copy). Should a serial come
		// back with another expiry, drop the old index entry so the two
		// buckets stay twins.
		if old := svids.Get(r.serial); old != nil && !bytes.Equal(old, r.idxKey[:expiryPrefixLen]) {
			if err := idx.Delete(append(bytes.Clone(old), r.serial...)); err != nil {
				return err
			}
		}
		if err := putInventoryRow(svids, idx, r.serial, r.idxKey, r.val); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketMeta).Put(keyWALCheckpoint, encodePos(rows[len(rows)-1].end))
}

// ---- writing (committer goroutine only) ----

// claimSerials sets r.err to ErrAlreadyExists for every row whose serial is
// already recorded, pending in the WAL or earlier in the same batch, and
// claims the others in the pending set so that no later row can take them.
// The pending set is checked first and bbolt second: the folder removes a
// serial from the set only after the bbolt transaction holding it has
// committed, so a serial is always in at least one of the two places.
func (s *Store) claimSerials(batch []*svidReq) error {
	s.pmu.Lock()
	for _, r := range batch {
		if _, dup := s.pendingSet[string(r.serial)]; dup {
			r.err = fmt.Errorf("record svid %s: %w", r.serial, store.ErrAlreadyExists)
			continue
		}
		s.pendingSet[string(r.serial)] = struct{}{}
		r.claimed = true
	}
	s.pmu.Unlock()
	err := s.db.View(func(tx *bolt.Tx) error {
		svids := tx.Bucket(bucketSVIDs)
		for _, r := range batch {
			if r.claimed && svids.Get(r.serial) != nil {
				r.err = fmt.Errorf("record svid %s: %w", r.serial, store.ErrAlreadyExists)
			}
		}
		return nil
	})
	if err != nil {
		s.release(batch, func(*svidReq) bool { return true })
		return wrapTxErr("record svid: duplicate check", err)
	}
	s.release(batch, func(r *svidReq) bool { return r.err != nil })
	return nil
}

// release drops the pending-set claims of the rows picked by drop.
func (s *Store) release(batch []*svidReq, drop func(*svidReq) bool) {
	s.pmu.Lock()
	for _, r := range batch {
		if r.claimed && drop(r) {
			delete(s.pendingSet, string(r.serial))
			r.claimed = false
		}
	}
	s.pmu.Unlock()
}

// appendWAL makes rows durable in the WAL and adds them to the pending list.
// Rows are written in chunks that fit in one segment (normally the whole
// group is one chunk: one pwrite and one fdatasync); a chunk's rows share
// its outcome in r.err.
func (s *Store) appendWAL(rows []*svidReq) {
	for len(rows) > 0 {
		size, n := int64(0), 0
		for _, r := range rows {
			fl := int64(walHeaderLen + len(r.val))
			if size+fl > s.segSize {
				break
			}
			size += fl
			n++
		}
		chunk := rows[:n]
		rows = rows[n:]
		if err := s.appendChunk(chunk, size); err != nil {
			for _, r := range chunk {
				r.err = err
			}
		}
	}
}

func (s *Store) appendChunk(chunk []*svidReq, size int64) error {
	s.wmu.Lock()
	err := s.walErr
	s.wmu.Unlock()
	if err != nil {
		return err
	}
	if s.tail+size > s.segSize {
		if err := s.rollover(); err != nil {
			s.log.Error("wal segment switch failed", "err", err)
			return fmt.Errorf("record svid: %w", err)
		}
	}
	sg, off := s.active, s.tail
	buf := s.frameBuf[:0]
	for _, r := range chunk {
		buf = appendFrame(buf, sg.seed, r.val)
	}
	s.frameBuf = buf
	if err := writeSync(sg.f, buf, off); err != nil {
		s.log.Error("wal write failed", "segment", sg.path, "offset", off, "rows", len(chunk), "err", err)
		// The frames may still reach the disk and be replayed, which would
		// record rows whose callers were told they were not. Overwrite them
		// with zeros; if even that fails, stop accepting rows at all.
		if zerr := writeSync(sg.f, make([]byte, len(buf)), off); zerr != nil {
			s.wmu.Lock()
			s.walErr = fmt.Errorf("record svid: inventory wal unusable after a failed write (%v; invalidating it: %v); restart the server", err, zerr)
			s.wmu.Unlock()
			s.log.Error("inventory wal disabled", "err", zerr)
		}
		return fmt.Errorf("record svid: wal write: %w", err)
	}
	s.wmu.Lock()
	s.tail = off + size
	s.wmu.Unlock()

	end := off
	s.pmu.Lock()
	for _, r := range chunk {
		end += int64(walHeaderLen + len(r.val))
		s.pending = append(s.pending, walRow{serial: r.serial, idxKey: r.idxKey, val: r.val, end: walPos{sg.seq, end}})
	}
	kick := len(s.pending) >= s.foldRows
	s.pmu.Unlock()
	if kick {
		s.kickFold()
	}
	return nil
}

func writeSync(f *os.File, buf []byte, off int64) error {
	if _, err := f.WriteAt(buf, off); err != nil {
		return err
	}
	return fdatasync(f)
}

// rollover seals the active segment and makes the spare (or, if none is
// ready, a new segment) the active one.
func (s *Store) rollover() error {
	s.rollMu.Lock()
	defer s.rollMu.Unlock()
	s.wmu.Lock()
	next, seq := s.spare, s.active.seq+1
	s.spare = nil
	s.wmu.Unlock()
	if next != nil && next.seq != seq { // cannot happen: spares are named under rollMu
		_ = next.f.Close()
		_ = os.Remove(next.path)
		next = nil
	}
	if next == nil {
		var err error
		if next, err = s.createSegment(seq); err != nil {
			return err
		}
	}
	s.wmu.Lock()
	s.active.end = s.tail
	s.sealed = append(s.sealed, s.active)
	s.active, s.tail = next, 0
	s.wmu.Unlock()
	s.kickFold() // so the folder can free the sealed segment and prepare a spare
	return nil
}

// ---- folding ----

func (s *Store) kickFold() {
	select {
	case s.foldKick <- struct{}{}:
	default:
	}
}

// foldLoop is the folder goroutine started by Open. It stops after a final
// fold once Close has stopped the committer.
func (s *Store) foldLoop() {
	defer close(s.foldDone)
	t := time.NewTicker(s.foldInterval)
	defer t.Stop()
	for {
		select {
		case <-s.foldStop:
			if err := s.fold(); err != nil {
				s.log.Error("final inventory fold failed; the rows stay in the wal and are replayed at the next open", "err", err)
			}
			return
		case <-t.C:
		case <-s.foldKick:
		}
		if err := s.fold(); err != nil {
			s.log.Error("inventory fold failed, will retry", "err", err)
		}
		if err := s.maintainSegments(); err != nil {
			s.log.Error("wal segment maintenance failed, will retry", "err", err)
		}
	}
}

// fold moves every pending row into bbolt. Readers call it before reading
// the inventory, so that they see every acknowledged row.
func (s *Store) fold() error {
	s.foldMu.Lock()
	defer s.foldMu.Unlock()
	s.pmu.Lock()
	rows := s.pending
	s.pending = nil
	s.pmu.Unlock()
	if len(rows) == 0 {
		return nil
	}
	done := 0
	var err error
	for done < len(rows) && err == nil {
		part := rows[done:min(done+foldTxRows, len(rows))]
		if err = s.db.Update(func(tx *bolt.Tx) error { return foldInto(tx, part) }); err != nil {
			break
		}
		s.pmu.Lock()
		for _, r := range part {
			delete(s.pendingSet, string(r.serial))
		}
		s.pmu.Unlock()
		s.wmu.Lock()
		s.ckpt = part[len(part)-1].end
		s.wmu.Unlock()
		s.folds.Add(1)
		done += len(part)
	}
	s.pmu.Lock()
	if done < len(rows) {
		// Put the rest back in front of what arrived meanwhile; they are
		// safe in the WAL and the next fold retries them.
		s.pending = append(rows[done:len(rows):len(rows)], s.pending...)
	}
	s.pcond.Broadcast()
	s.pmu.Unlock()
	if err != nil {
		return wrapTxErr("fold inventory wal", err)
	}
	return nil
}

// foldPending is fold for readers, with the reader's operation name.
func (s *Store) foldPending(op string) error {
	if err := s.fold(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// maintainSegments frees sealed segments that are entirely behind the
// checkpoint, keeping one as the next spare, and makes a new spare once the
// active segment is half full and nothing could be recycled, so that the
// committer never has to create a segment while callers wait.
func (s *Store) maintainSegments() error {
	s.rollMu.Lock()
	defer s.rollMu.Unlock()
	s.wmu.Lock()
	var free []*segment
	keep := s.sealed[:0]
	for _, sg := range s.sealed {
		if s.ckpt.covers(walPos{sg.seq, sg.end}) {
			free = append(free, sg)
		} else {
			keep = append(keep, sg)
		}
	}
	clear(s.sealed[len(keep):])
	s.sealed = keep
	needSpare := s.spare == nil
	nextSeq := s.active.seq + 1
	halfFull := s.tail > s.segSize/2
	s.wmu.Unlock()

	var firstErr error
	for _, sg := range free {
		if needSpare {
			err := s.renameSegment(sg, nextSeq)
			if err == nil {
				err = syncDir(filepath.Dir(sg.path))
			}
			if err == nil {
				s.wmu.Lock()
				s.spare = sg
				s.wmu.Unlock()
				needSpare = false
				s.log.Debug("wal segment recycled", "path", sg.path)
				continue
			}
			firstErr = firstOf(firstErr, err)
		}
		_ = sg.f.Close()
		if err := os.Remove(sg.path); err != nil {
			firstErr = firstOf(firstErr, err)
		}
	}
	if needSpare && halfFull {
		sg, err := s.createSegment(nextSeq)
		if err != nil {
			return firstOf(firstErr, err)
		}
		s.wmu.Lock()
		s.spare = sg
		s.wmu.Unlock()
	}
	return firstErr
}

func firstOf(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// ---- check ----

// checkWAL verifies the live segments' framing: every frame from offset 0 to
// the tail (to the recorded end, for a sealed segment) must be intact and
// decode, and the checkpoint stored in bbolt must fall on a frame boundary.
func (s *Store) checkWAL(ckpt walPos) error {
	s.rollMu.Lock()
	defer s.rollMu.Unlock()
	if s.closing.Load() {
		return fmt.Errorf("check wal: %w", store.ErrClosed)
	}
	s.wmu.Lock()
	segs := append(slices.Clone(s.sealed), s.active)
	limits := make([]int64, len(segs))
	for i, sg := range s.sealed {
		limits[i] = sg.end
	}
	limits[len(segs)-1] = s.tail
	s.wmu.Unlock()

	if ckpt.seg > segs[len(segs)-1].seq {
		return fmt.Errorf("check wal: checkpoint in segment %x is ahead of the active segment %x", ckpt.seg, segs[len(segs)-1].seq)
	}
	ckptFound := ckpt.seg < segs[0].seq || ckpt.off == 0
	for i, sg := range segs {
		var derr error
		end, err := scanSegment(sg.f, sg.seed, 0, limits[i], func(p []byte, end int64) error {
			if _, err := decodeSVID(p); err != nil {
				derr = fmt.Errorf("check wal: segment %s frame ending at %d: %w", sg.path, end, err)
				return derr
			}
			if sg.seq == ckpt.seg && end == ckpt.off {
				ckptFound = true
			}
			return nil
		})
		if derr != nil {
			return derr
		}
		if err != nil {
			return fmt.Errorf("check wal: segment %s: %w", sg.path, err)
		}
		if end != limits[i] {
			return fmt.Errorf("check wal: segment %s: valid frames end at offset %d, but rows were acknowledged up to %d", sg.path, end, limits[i])
		}
	}
	if !ckptFound {
		return fmt.Errorf("check wal: checkpoint %x:%d is not on a frame boundary", ckpt.seg, ckpt.off)
	}
	return nil
}

// closeSegments closes every segment file; Close calls it once both
// goroutines have stopped.
func (s *Store) closeSegments() error {
	s.rollMu.Lock()
	defer s.rollMu.Unlock()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	var firstErr error
	for _, sg := range append(slices.Clone(s.sealed), s.active, s.spare) {
		if sg != nil {
			firstErr = firstOf(firstErr, sg.f.Close())
		}
	}
	return firstErr
}
