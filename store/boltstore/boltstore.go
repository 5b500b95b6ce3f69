// Package boltstore is the embedded store.Store: one bbolt file in the
// server's data dir. bbolt takes an exclusive flock on the file, so exactly
// one meshid server can use a data dir at a time.
package boltstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/meshid/meshid/store"
)

// SchemaVersion is the layout of buckets and keys this package reads and
// writes. It is stored in the meta bucket when a file is created and checked
// on every Open; a binary never guesses at a layout it does not know.
const SchemaVersion = 1

// DefaultLockTimeout is how long Open waits for another process to release
// the file lock when Options.LockTimeout is zero.
const DefaultLockTimeout = time.Second

var (
	bucketMeta       = []byte("meta")
	bucketCAs        = []byte("cas")
	bucketEntries    = []byte("entries")
	bucketEntryUniq  = []byte("entry_uniq")
	bucketSVIDs      = []byte("svids")
	bucketSVIDExpiry = []byte("svids_by_expiry")
	bucketAudit      = []byte("audit")
	bucketTokens     = []byte("tokens")

	allBuckets = [][]byte{bucketMeta, bucketCAs, bucketEntries, bucketEntryUniq, bucketSVIDs, bucketSVIDExpiry, bucketAudit, bucketTokens, bucketRevoked}

	keySchema = []byte("schema_version")
)

// Options configures Open. The zero value is usable.
type Options struct {
	// Logger receives operational messages; nil discards them.
	Logger *slog.Logger
	// LockTimeout bounds how long Open waits for the file lock held by
	// another process before failing with store.ErrLocked. Zero means
	// DefaultLockTimeout; bbolt's own "zero waits forever" is never used, so
	// a second server fails instead of hanging.
	LockTimeout time.Duration
	// Now stamps audit events that arrive without a time; nil is time.Now.
	Now func() time.Time
	// UnsafeNoSync skips bbolt's fsyncs: a crash may lose or corrupt data.
	// Only for bulk loading a store that can be rebuilt (benchmarks, tests).
	UnsafeNoSync bool
	// WatchRetain bounds how many changes the watch log keeps for replay
	// and for watchers that lag; zero means DefaultWatchRetain.
	WatchRetain int

	// probeInterval is how often a store that stopped taking writes
	// after a full disk tries a write again; zero means
	// defaultProbeInterval. Tests shrink it.
	probeInterval time.Duration
}

// Store is a store.Store on a bbolt file. Create it with Open; it is safe for
// concurrent use.
type Store struct {
	db   *bolt.DB
	path string
	log  *slog.Logger
	now  func() time.Time

	// The RecordSVID group-commit queue; see commitLoop.
	qmu        sync.Mutex
	qcond      *sync.Cond
	queue      []*svidReq
	spareQ     []*svidReq
	qclosed    bool
	commitDone chan struct{}
	commits    atomic.Int64 // group commits done, for tests and benchmarks
	closing    atomic.Bool  // Close has begun

	// Write health; see health.go.
	hmu           sync.Mutex
	health        *writeFailure // nil while writes are durable
	probeInterval time.Duration
	probeKick     chan struct{}
	probeStop     chan struct{}
	probeDone     chan struct{}

	// beforeCommit, if set (by tests), runs in the committer at the start
	// of every group.
	beforeCommit func()

	// Watch and leadership; see watch.go. wmu orders watched commits.
	wmu       sync.Mutex
	hub       hub
	leaderSem chan struct{}
	lmu       sync.Mutex
	leader    *leadership

	closeOnce sync.Once
	closeErr  error
}

var _ store.Store = (*Store)(nil)

// Open opens or creates the store file at path (mode 0600, parent directory
// created 0700 if missing). It fails with store.ErrLocked if another process
// holds the file and with store.ErrSchema if the file was written with a
// different SchemaVersion.
func Open(path string, opts Options) (*Store, error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = DefaultLockTimeout
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.WatchRetain <= 0 {
		opts.WatchRetain = DefaultWatchRetain
	}
	if opts.probeInterval <= 0 {
		opts.probeInterval = defaultProbeInterval
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open store: create data dir: %w", err)
	}
	// bbolt maps the file and reads the pages its meta page names; on a
	// truncated file that is a SIGBUS, not an error. Check first.
	if err := checkFileSize(path); err != nil {
		return nil, err
	}
	db, err := openBolt(path, &bolt.Options{
		Timeout: opts.LockTimeout,
		// The hashmap freelist makes page allocation O(1) instead of a scan
		// of the sorted array; it matters once the file has many free pages
		// (after prunes) and costs nothing otherwise.
		FreelistType: bolt.FreelistMapType,
		MmapFlags:    mmapFlags,
		NoSync:       opts.UnsafeNoSync,
	})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("data dir %s is in use by another meshid server (bbolt lock on %s not released within %s): %w",
			dir, path, opts.LockTimeout, store.ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	created, err := initSchema(db, path)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	var rev int64
	_ = db.View(func(tx *bolt.Tx) error { rev = readRevision(tx.Bucket(bucketMeta)); return nil })
	s := &Store{
		db:            db,
		path:          path,
		log:           log,
		now:           opts.Now,
		commitDone:    make(chan struct{}),
		probeInterval: opts.probeInterval,
		probeKick:     make(chan struct{}, 1),
		probeStop:     make(chan struct{}),
		probeDone:     make(chan struct{}),
		leaderSem:     make(chan struct{}, 1),
	}
	s.hub.init(rev, opts.WatchRetain)
	s.qcond = sync.NewCond(&s.qmu)
	// Under bbolt's lock: only the process holding the db touches the
	// segments of the retired WAL.
	if err := s.foldLegacyWAL(); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	go s.commitLoop()
	go s.probeLoop()
	log.Info("store opened", "path", path, "schema_version", SchemaVersion, "created", created)
	return s, nil
}

// openBolt is bolt.Open that turns a crash on a damaged file into an error
// naming it: bbolt panics on some corrupt pages (a zeroed freelist page), and
// a fault on its mapping is made a panic too, for the damage checkFileSize
// cannot see. The process is expected to exit after such an error (the
// handle bbolt had open is not released).
func openBolt(path string, o *bolt.Options) (db *bolt.DB, err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			db = nil
			err = fmt.Errorf("file is damaged (%s); restore it from a backup", strings.ReplaceAll(fmt.Sprint(r), "\n", " "))
		}
	}()
	return bolt.Open(path, 0o600, o)
}

// initSchema stamps a new file with SchemaVersion and checks an existing one.
// The common case (an existing, current file) only needs a read transaction,
// which spares an fsync at every start-up.
func initSchema(db *bolt.DB, path string) (created bool, err error) {
	var fresh bool
	err = db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			empty := true
			_ = tx.ForEach(func([]byte, *bolt.Bucket) error { empty = false; return nil })
			if !empty {
				return fmt.Errorf("open store %s: file has buckets but no meta bucket, not a meshid store: %w", path, store.ErrSchema)
			}
			fresh = true
			return nil
		}
		v := meta.Get(keySchema)
		if len(v) != 8 {
			return fmt.Errorf("open store %s: schema version missing or malformed, this meshid supports %d: %w", path, SchemaVersion, store.ErrSchema)
		}
		if got := binary.BigEndian.Uint64(v); got != SchemaVersion {
			return fmt.Errorf("open store %s: file has schema version %d, this meshid supports %d: %w", path, got, SchemaVersion, store.ErrSchema)
		}
		for _, name := range allBuckets {
			if tx.Bucket(name) == nil {
				return fmt.Errorf("open store %s: bucket %q missing (corrupt file?)", path, name)
			}
		}
		return nil
	})
	if err != nil || !fresh {
		return false, err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucket(name); err != nil {
				return fmt.Errorf("create bucket %s: %w", name, err)
			}
		}
		return putSchemaVersion(tx, SchemaVersion)
	})
	if err != nil {
		return false, fmt.Errorf("open store %s: initialise: %w", path, err)
	}
	return true, nil
}

func putSchemaVersion(tx *bolt.Tx, v uint64) error {
	return tx.Bucket(bucketMeta).Put(keySchema, binary.BigEndian.AppendUint64(nil, v))
}

// Close waits for queued RecordSVID commits, then closes the file. Calling it
// again returns the first result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		s.qmu.Lock()
		s.qclosed = true
		s.qcond.Broadcast()
		s.qmu.Unlock()
		<-s.commitDone
		close(s.probeStop)
		<-s.probeDone
		s.hub.close()
		s.endLeadership()
		if err := s.db.Close(); err != nil {
			s.closeErr = fmt.Errorf("close store %s: %w", s.path, err)
		}
		s.log.Info("store closed", "path", s.path)
	})
	return s.closeErr
}

// view runs fn in a read transaction and gives bbolt's own errors the
// operation's name; after Close it reports store.ErrClosed. Reads never
// depend on write health: listing works on a full disk.
func (s *Store) view(op string, fn func(*bolt.Tx) error) error {
	return wrapTxErr(op, s.db.View(fn))
}

// update runs fn in a write transaction, refused with store.ErrUnavailable
// while the store cannot make writes durable (see health.go). It is for
// writes that add something: an entry, a token, a CA, an audit event.
func (s *Store) update(op string, fn func(*bolt.Tx) error) error {
	if err := s.Health(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return s.commitTx(op, fn)
}

// updateAlways is update without the health gate, for writes that take
// trust away (revocations, entry and token deletion) or free space
// (pruning): they are always attempted, since refusing them protects
// nothing, and a full disk often still has room in the file's free pages
// for them. A success does not clear the unhealthy state; only the probe
// does, so one small write cannot turn minting back on.
func (s *Store) updateAlways(op string, fn func(*bolt.Tx) error) error {
	return s.commitTx(op, fn)
}

// commitTx runs fn in a bbolt write transaction. An error from fn is the
// caller's (nothing was written); an error after fn succeeded came from the
// commit itself, i.e. a write or fsync failed, and makes the store unhealthy.
func (s *Store) commitTx(op string, fn func(*bolt.Tx) error) error {
	var fnErr error
	err := s.db.Update(func(tx *bolt.Tx) error {
		fnErr = fn(tx)
		return fnErr
	})
	if err != nil && fnErr == nil && !errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return fmt.Errorf("%s: %w", op, s.commitFailed(op, err))
	}
	return wrapTxErr(op, err)
}

func wrapTxErr(op string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, berrors.ErrDatabaseNotOpen):
		return fmt.Errorf("%s: %w", op, store.ErrClosed)
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
}

// ---- CAs ----

// PutCA inserts or replaces a CA record and, if audit is non-nil, records the
// event in the same transaction.
func (s *Store) PutCA(ctx context.Context, rec store.CARecord, audit *store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if rec.ID == "" {
		return fmt.Errorf("put ca: empty id: %w", store.ErrInvalid)
	}
	val := encodeCA(&rec)
	stored, err := decodeCA(val) // what a read returns, for the watch
	if err != nil {
		return fmt.Errorf("put ca %s: %w", rec.ID, err)
	}
	return s.commitWatched("put ca "+rec.ID, true, func(tx *bolt.Tx, ch *changes) error {
		if err := tx.Bucket(bucketCAs).Put([]byte(rec.ID), val); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindCA, Op: store.OpPut, Key: rec.ID, CA: &stored})
		if audit != nil {
			return s.appendAudit(tx, *audit)
		}
		return nil
	})
}

// ListCAs returns every CA record, oldest CreatedAt first (ties by ID).
func (s *Store) ListCAs(ctx context.Context) ([]store.CARecord, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []store.CARecord
	err := s.view("list cas", func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCAs).ForEach(func(k, v []byte) error {
			c, err := decodeCA(v)
			if err != nil {
				return fmt.Errorf("ca %q: %w", k, err)
			}
			out = append(out, c)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	// Keys are IDs, so ForEach order is by ID and a stable sort keeps that
	// as the tie-break.
	slices.SortStableFunc(out, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

// ---- entries ----

// uniqKey identifies an entry's (SpiffeID, selector set) pair. Fields are
// length-prefixed before hashing so that no two different pairs serialise
// alike ("a"+"bc" vs "ab"+"c"). Selectors are taken in the caller's order,
// which the Store contract says is sorted.
func uniqKey(e *store.Entry) []byte {
	var b enc
	b.str(e.SpiffeID)
	b.uvarint(uint64(len(e.Selectors)))
	for _, s := range e.Selectors {
		b.str(s.Type)
		b.str(s.Value)
	}
	sum := sha256.Sum256(b.b)
	return sum[:]
}

// CreateEntry stores a new entry and its audit event in one transaction.
func (s *Store) CreateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return fmt.Errorf("create entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val := encodeEntry(&e)
	stored, err := decodeEntry(val)
	if err != nil {
		return fmt.Errorf("create entry %s: %w", e.ID, err)
	}
	uk := uniqKey(&e)
	id := []byte(e.ID)
	return s.commitWatched("create entry "+e.ID, true, func(tx *bolt.Tx, ch *changes) error {
		entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
		if entries.Get(id) != nil {
			return fmt.Errorf("entry id %s: %w", e.ID, store.ErrAlreadyExists)
		}
		if other := uniq.Get(uk); other != nil {
			return fmt.Errorf("entry %s has the same spiffe id %s and selectors: %w", other, e.SpiffeID, store.ErrAlreadyExists)
		}
		if err := entries.Put(id, val); err != nil {
			return err
		}
		if err := uniq.Put(uk, id); err != nil {
			return err
		}
		ch.add(store.Event{Kind: store.KindEntry, Op: store.OpPut, Key: e.ID, Entry: &stored})
		return s.appendAudit(tx, audit)
	})
}

// DeleteEntry removes an entry and records the audit event in one
// transaction, returning the deleted entry.
func (s *Store) DeleteEntry(ctx context.Context, id string, audit store.AuditEvent) (store.Entry, error) {
	if err := ctx.Err(); err != nil {
		return store.Entry{}, err
	}
	var e store.Entry
	err := s.commitWatched("delete entry "+id, false, func(tx *bolt.Tx, ch *changes) error {
		entries, uniq := tx.Bucket(bucketEntries), tx.Bucket(bucketEntryUniq)
		v := entries.Get([]byte(id))
		if v == nil {
			return fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var err error
		if e, err = decodeEntry(v); err != nil {
			return err
		}
		if err := entries.Delete([]byte(id)); err != nil {
			return err
		}
		// Only drop the uniqueness claim if it is ours; a mismatch would mean
		// an inconsistent file, and deleting another entry's claim would let
		// a duplicate in.
		uk := uniqKey(&e)
		if bytes.Equal(uniq.Get(uk), []byte(id)) {
			if err := uniq.Delete(uk); err != nil {
				return err
			}
		}
		old := e
		ch.add(store.Event{Kind: store.KindEntry, Op: store.OpDelete, Key: id, Entry: &old})
		return s.appendAudit(tx, audit)
	})
	if err != nil {
		return store.Entry{}, err
	}
	return e, nil
}

// GetEntry returns one entry or store.ErrNotFound.
func (s *Store) GetEntry(ctx context.Context, id string) (store.Entry, error) {
	if err := ctx.Err(); err != nil {
		return store.Entry{}, err
	}
	var e store.Entry
	err := s.view("get entry "+id, func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketEntries).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var err error
		e, err = decodeEntry(v)
		return err
	})
	return e, err
}

// ListEntries pages through entries by ID. The page token is the last ID of
// the previous page.
func (s *Store) ListEntries(ctx context.Context, q store.EntryQuery) ([]store.Entry, string, error) {
	if err := ctx.Err(); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list entries: negative page size: %w", store.ErrInvalid)
	}
	var (
		out  []store.Entry
		next string
	)
	if q.PageSize > 0 {
		out = make([]store.Entry, 0, min(q.PageSize, 1024))
	}
	err := s.view("list entries", func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEntries)
		if q.PageSize == 0 {
			// Start-up loads every entry: size the slice once.
			out = make([]store.Entry, 0, b.Stats().KeyN)
		}
		c := b.Cursor()
		var k, v []byte
		if q.PageToken == "" {
			k, v = c.First()
		} else {
			after := []byte(q.PageToken)
			k, v = c.Seek(after)
			if bytes.Equal(k, after) {
				k, v = c.Next()
			}
		}
		for ; k != nil; k, v = c.Next() {
			if q.PageSize > 0 && len(out) == q.PageSize {
				next = out[len(out)-1].ID
				break
			}
			if len(out)%4096 == 4095 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			e, err := decodeEntry(v)
			if err != nil {
				return fmt.Errorf("entry %q: %w", k, err)
			}
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	return out, next, nil
}

// ---- audit ----

func (s *Store) appendAudit(tx *bolt.Tx, ev store.AuditEvent) error {
	if ev.Time.IsZero() {
		ev.Time = s.now()
	}
	b := tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return fmt.Errorf("audit sequence: %w", err)
	}
	if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), encodeAudit(&ev)); err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// AppendAudit records an admin action that has no store change of its own.
// A zero Time is replaced by Options.Now.
func (s *Store) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.update("append audit", func(tx *bolt.Tx) error { return s.appendAudit(tx, ev) })
}

// ListAudit returns the newest events first, at most limit (0: all).
func (s *Store) ListAudit(ctx context.Context, limit int) ([]store.AuditEvent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if limit < 0 {
		return nil, fmt.Errorf("list audit: negative limit: %w", store.ErrInvalid)
	}
	var out []store.AuditEvent
	err := s.view("list audit", func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		for k, v := c.Last(); k != nil && (limit == 0 || len(out) < limit); k, v = c.Prev() {
			ev, err := decodeAudit(v)
			if err != nil {
				return fmt.Errorf("audit event %x: %w", k, err)
			}
			out = append(out, ev)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ---- inventory ----

// Serials are hex; the bound keeps one absurd row from failing the whole
// group commit it shares with other callers (bbolt rejects keys > 32 KiB).
const maxSerialLen = 128

// ListSVIDs pages through the inventory ordered by NotAfter, then Serial. The
// page token is the hex of the last row's index key.
func (s *Store) ListSVIDs(ctx context.Context, q store.SVIDQuery) ([]store.IssuedSVID, string, error) {
	if err := ctx.Err(); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list svids: negative page size: %w", store.ErrInvalid)
	}
	var start, after []byte
	if !q.NotExpiredAt.IsZero() {
		if !nanosInRange(q.NotExpiredAt) {
			return nil, "", fmt.Errorf("list svids: NotExpiredAt %s out of range: %w", q.NotExpiredAt, store.ErrInvalid)
		}
		if n := q.NotExpiredAt.UnixNano(); n < 1<<63-1 {
			start = expiryPrefix(n + 1) // strictly after: NotAfter <= NotExpiredAt is expired
		}
	}
	if q.PageToken != "" {
		tok, err := hex.DecodeString(q.PageToken)
		if err != nil || len(tok) < expiryPrefixLen {
			return nil, "", fmt.Errorf("list svids: malformed page token: %w", store.ErrInvalid)
		}
		if bytes.Compare(tok, start) >= 0 {
			start, after = tok, tok
		}
	}
	hasEnd := !q.ExpiringBefore.IsZero()
	var end int64
	if hasEnd {
		if !nanosInRange(q.ExpiringBefore) {
			return nil, "", fmt.Errorf("list svids: ExpiringBefore %s out of range: %w", q.ExpiringBefore, store.ErrInvalid)
		}
		end = q.ExpiringBefore.UnixNano()
	}

	var (
		out  []store.IssuedSVID
		next string
	)
	err := s.view("list svids", func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketSVIDExpiry).Cursor()
		first := func() (k, v []byte) {
			if start == nil {
				return c.First()
			}
			k, v = c.Seek(start)
			if after != nil && bytes.Equal(k, after) {
				k, v = c.Next()
			}
			return k, v
		}
		inRange := func(k []byte) bool { return k != nil && (!hasEnd || expiryKeyNanos(k) <= end) }

		// Count first, then decode into a slice of the exact size: a cursor
		// step costs far less than decoding a row, and growing a 100k-row
		// result by append would copy it over and over.
		n := 0
		k, _ := first()
		for ; inRange(k) && (q.PageSize == 0 || n < q.PageSize); k, _ = c.Next() {
			n++
		}
		more := inRange(k)

		out = make([]store.IssuedSVID, n)
		k, v := first()
		for i := range out {
			if i%4096 == 4095 {
				if err := ctx.Err(); err != nil {
					return err
				}
			}
			if err := decodeSVIDInto(&out[i], v); err != nil {
				return fmt.Errorf("svid index key %x: %w", k, err)
			}
			if i == n-1 && more {
				next = hex.EncodeToString(k)
			}
			k, v = c.Next()
		}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	if len(out) == 0 {
		out = nil
	}
	return out, next, nil
}

// PruneSVIDs deletes rows whose NotAfter is before cutoff, from both the
// serial bucket and the expiry index, in one transaction.
func (s *Store) PruneSVIDs(ctx context.Context, cutoff time.Time) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if !nanosInRange(cutoff) {
		return 0, fmt.Errorf("prune svids: cutoff %s out of range: %w", cutoff, store.ErrInvalid)
	}
	end := cutoff.UnixNano()
	var n int
	err := s.updateAlways("prune svids", func(tx *bolt.Tx) error {
		idx, svids := tx.Bucket(bucketSVIDExpiry), tx.Bucket(bucketSVIDs)
		// Collect first, delete after: deleting under a live cursor is easy
		// to get subtly wrong in bbolt (Next after Delete can skip a key).
		var doomed [][]byte
		c := idx.Cursor()
		for k, _ := c.First(); k != nil && expiryKeyNanos(k) < end; k, _ = c.Next() {
			doomed = append(doomed, bytes.Clone(k))
		}
		for _, k := range doomed {
			if err := idx.Delete(k); err != nil {
				return err
			}
			if err := svids.Delete(k[expiryPrefixLen:]); err != nil {
				return err
			}
		}
		n = len(doomed)
		return nil
	})
	if err != nil {
		return 0, err
	}
	if n > 0 {
		s.log.Debug("pruned svid inventory", "rows", n, "cutoff", cutoff)
	}
	return n, nil
}

// ---- group commit ----

// RecordSVID is on the issuance path and must be durable, so every call ends
// in a bbolt commit (pages, fdatasync, meta page, fdatasync). Giving each
// caller its own transaction would cap throughput at one row per commit.
// Instead callers are committed in groups, each group one bbolt Update.
//
// bbolt's db.Batch does this too, but it waits up to MaxBatchDelay (10 ms by
// default) for a batch to fill, and that fixed delay, not the disk, is then
// the limit: ~MaxBatchSize per delay at best, and every lightly-loaded call
// pays the full delay. An owned committer goroutine needs no delay: it takes
// everything queued, writes it in one Update, answers every waiter, and goes
// again. Whatever arrives while a commit is in progress forms the next group,
// so the group size adapts to load by itself: one caller alone sees one
// commit of latency; with N callers most of them share each commit, which
// BenchmarkRecordSVID reports as rows/commit.
// A further benefit over db.Batch: a duplicate serial does not make its
// neighbours retry one by one; it alone gets ErrAlreadyExists.
//
// There is no second on-disk format (an earlier version had a WAL in front
// of bbolt; legacywal.go folds one left behind): when RecordSVID returns nil
// the row is in a committed bbolt transaction, and when the commit fails
// every row of the group gets an error wrapping store.ErrUnavailable and the
// store stops taking writes (health.go).
//
// A caller whose context ends while its row is still queued takes the row
// back out (state queued -> cancelled) and nothing is written. Once the
// committer has taken the row (queued -> taken) the caller waits for the
// outcome, which costs at most one commit, so that an error return always
// means "not recorded", as the Store contract promises.
type svidReq struct {
	serial []byte
	idxKey []byte
	val    []byte
	state  reqState
	err    error      // set by the committer inside the transaction
	done   chan error // buffered: the committer never blocks on a caller
}

// RecordSVID durably records an issued SVID. It returns once the bbolt
// transaction holding the row, together with whatever other rows were queued
// at the same time, has committed. A second row with the same serial gets
// store.ErrAlreadyExists; while the store cannot write (a full disk), every
// call gets an error wrapping store.ErrUnavailable.
func (s *Store) RecordSVID(ctx context.Context, rec store.IssuedSVID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if rec.Serial == "" || len(rec.Serial) > maxSerialLen {
		return fmt.Errorf("record svid: serial must be 1..%d bytes: %w", maxSerialLen, store.ErrInvalid)
	}
	if rec.NotAfter.IsZero() || !nanosInRange(rec.NotAfter) {
		return fmt.Errorf("record svid %s: NotAfter %s out of range: %w", rec.Serial, rec.NotAfter, store.ErrInvalid)
	}
	if err := s.Health(); err != nil {
		return fmt.Errorf("record svid %s: %w", rec.Serial, err)
	}
	r := &svidReq{
		serial: []byte(rec.Serial),
		idxKey: expiryKey(rec.NotAfter, rec.Serial),
		val:    encodeSVID(&rec),
		done:   make(chan error, 1),
	}
	s.qmu.Lock()
	if s.qclosed {
		s.qmu.Unlock()
		return fmt.Errorf("record svid %s: %w", rec.Serial, store.ErrClosed)
	}
	s.queue = append(s.queue, r)
	s.qcond.Signal()
	s.qmu.Unlock()

	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		if r.state.cas(reqQueued, reqCancelled) {
			return fmt.Errorf("record svid %s: %w", rec.Serial, ctx.Err())
		}
		return <-r.done
	}
}

// commitLoop is the committer goroutine started by Open. It exits once Close
// has been called and the queue is empty, so Close never loses a row it
// accepted.
func (s *Store) commitLoop() {
	defer close(s.commitDone)
	for {
		s.qmu.Lock()
		for len(s.queue) == 0 && !s.qclosed {
			s.qcond.Wait()
		}
		if !s.qclosed {
			// Let the goroutines that are runnable right now (handlers
			// about to call RecordSVID) queue their rows first: no timed
			// delay, and none at all on an idle server, but on a busy one
			// it makes the groups, and so the commits per row, better.
			s.qmu.Unlock()
			runtime.Gosched()
			s.qmu.Lock()
		}
		if len(s.queue) == 0 { // closed and drained
			s.qmu.Unlock()
			return
		}
		// Swap the two slices so the queue keeps its capacity and the
		// steady state allocates nothing here.
		batch := s.queue
		s.queue = s.spareQ[:0]
		s.qmu.Unlock()

		live := batch[:0]
		for _, r := range batch {
			if r.state.cas(reqQueued, reqTaken) {
				live = append(live, r)
			}
		}
		if len(live) > 0 {
			s.commit(live)
		}
		clear(batch)
		s.qmu.Lock()
		s.spareQ = batch[:0]
		s.qmu.Unlock()
	}
}

// commit records one group in one bbolt transaction and answers every row.
func (s *Store) commit(batch []*svidReq) {
	s.commits.Add(1)
	if h := s.beforeCommit; h != nil {
		h()
	}
	// Rows queued before the store went unhealthy are refused like new ones:
	// one failed commit is enough to know the disk is not taking writes.
	err := s.update("record svid: group commit", func(tx *bolt.Tx) error {
		svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
		idx.FillPercent = expiryFillPercent
		for _, r := range batch {
			r.err = nil
			// Also catches a duplicate earlier in the same group: its Put is
			// visible to this Get.
			if svids.Get(r.serial) != nil {
				r.err = fmt.Errorf("record svid %s: %w", r.serial, store.ErrAlreadyExists)
				continue
			}
			if err := putInventoryRow(svids, idx, r.serial, r.idxKey, r.val); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, store.ErrUnavailable) {
		s.log.Error("svid group commit failed", "rows", len(batch), "err", err)
	}
	for _, r := range batch {
		if err != nil {
			r.done <- err
		} else {
			r.done <- r.err
		}
	}
}

// putInventoryRow writes one inventory row: the record itself under its
// expiry index key, and the serial pointing at that key. Both go into the
// caller's transaction, so neither can exist without the other.
//
// The record lives only in the index because that is where it is read (in
// expiry order) and where it is appended almost in order. Serials are random,
// so every row lands on a different leaf of the serial bucket and each commit
// rewrites about one page per row there; keeping those values to 8 bytes
// keeps that bucket (and the pages a commit rewrites) small.
func putInventoryRow(svids, idx *bolt.Bucket, serial, idxKey, val []byte) error {
	if err := svids.Put(serial, idxKey[:expiryPrefixLen]); err != nil {
		return fmt.Errorf("svid %s: %w", serial, err)
	}
	if err := idx.Put(idxKey, val); err != nil {
		return fmt.Errorf("svid %s index: %w", serial, err)
	}
	return nil
}

// reqState is where a queued RecordSVID row is: only one of the caller
// (cancelling) and the committer (taking) can move it out of reqQueued.
type reqState struct{ v atomic.Int32 }

const (
	reqQueued int32 = iota
	reqTaken
	reqCancelled
)

func (s *reqState) cas(from, to int32) bool { return s.v.CompareAndSwap(from, to) }
