// Package boltstore is the embedded store.Store: one bbolt file in the
// server's data dir. bbolt takes an exclusive flock on the file, so exactly
// one meshid server can use a data dir at a time.
package boltstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
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

	// Watch and leadership; see watch.go. Watched commits are ordered
	// by the committer (groupcommit.go), the only goroutine making them.
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
