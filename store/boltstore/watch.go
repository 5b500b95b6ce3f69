package boltstore

// Watch on bbolt: a revision counter in the meta bucket, bumped in the same
// transaction as every write that changes watched state, and a bounded
// in-memory log of the recent commits' changes for replay.
//
// The log is not persisted. Only this process can have the file open, so a
// consumer that could resume across a restart does not exist: after Open the
// revision continues from the file, and every revision before it counts as
// compacted (Watch(ctx, rev) with rev < Revision() fails with
// store.ErrCompacted and the consumer re-lists, which it does at start-up
// anyway).
//
// Writers never wait for watchers: a commit appends to the log under a mutex
// and wakes the watchers' goroutines. Each watcher takes one response at a
// time from the log, so what it holds beyond the log is one response; a
// watcher whose consumer does not keep up finds, when it comes back to the
// log, that what it needs next was dropped, and ends with ErrCompacted, as an
// etcd watcher does once compaction passes it.

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

// DefaultWatchRetain is how many changes (events, not commits) the log keeps
// for replay when Options.WatchRetain is zero. The server's projections are
// in the same process and read as fast as commits come; the margin is for a
// burst of revocations while one of them is busy.
const DefaultWatchRetain = 4096

var keyRevision = []byte("revision")

// changes collects one transaction's events; see commitWatched.
type changes struct{ events []store.Event }

func (c *changes) add(ev store.Event) { c.events = append(c.events, ev) }

func readRevision(meta *bolt.Bucket) int64 {
	v := meta.Get(keyRevision)
	if len(v) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(v))
}

// Revision returns the revision of the last commit that changed watched
// state (zero for a store that never had one).
func (s *Store) Revision(ctx context.Context) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if s.closing.Load() {
		return 0, fmt.Errorf("revision: %w", store.ErrClosed)
	}
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	return s.hub.rev, nil
}

// Compact drops the retained changes up to and including rev (capped at the
// current revision): Watch from an earlier revision then fails with
// store.ErrCompacted. The log compacts itself past Options.WatchRetain; this
// is for tests (the conformance suite) and for shedding memory on demand.
func (s *Store) Compact(ctx context.Context, rev int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.hub.compact(rev)
	return nil
}

// Watch streams changes after fromRev; see store.Store.
func (s *Store) Watch(ctx context.Context, fromRev int64) (store.Watcher, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if fromRev < 0 {
		return nil, fmt.Errorf("watch: negative revision %d: %w", fromRev, store.ErrInvalid)
	}
	h := &s.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, fmt.Errorf("watch: %w", store.ErrClosed)
	}
	if fromRev < h.compacted {
		return nil, fmt.Errorf("watch from revision %d: changes up to %d are no longer retained, list again: %w", fromRev, h.compacted, store.ErrCompacted)
	}
	w := &watcher{out: make(chan store.WatchResponse)}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		w.run(ctx, h, fromRev)
	}()
	return w, nil
}

// hub is the log of recent commits and the watchers' wake-up.
type hub struct {
	mu        sync.Mutex
	rev       int64                 // revision of the last published commit
	compacted int64                 // changes with Revision <= compacted are gone
	log       []store.WatchResponse // ascending Revision, all > compacted
	nevents   int                   // events in log
	retain    int                   // bound on nevents (the newest commit is always kept)
	wake      chan struct{}         // closed and replaced by every publish
	closed    bool
	done      chan struct{} // closed by close
	wg        sync.WaitGroup
}

func (h *hub) init(rev int64, retain int) {
	h.rev, h.compacted, h.retain = rev, rev, retain
	h.wake = make(chan struct{})
	h.done = make(chan struct{})
}

func (h *hub) publish(r store.WatchResponse) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.log = append(h.log, r)
	h.rev = r.Revision
	h.nevents += len(r.Events)
	for h.nevents > h.retain && len(h.log) > 1 {
		h.dropFirst()
	}
	close(h.wake)
	h.wake = make(chan struct{})
}

func (h *hub) dropFirst() {
	h.compacted = h.log[0].Revision
	h.nevents -= len(h.log[0].Events)
	h.log[0] = store.WatchResponse{} // let the events be collected
	h.log = h.log[1:]
}

func (h *hub) compact(rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rev = min(rev, h.rev)
	for len(h.log) > 0 && h.log[0].Revision <= rev {
		h.dropFirst()
	}
	h.compacted = max(h.compacted, rev)
}

// next returns the first retained commit after cursor, or, if there is none
// yet, a channel closed by the next publish.
func (h *hub) next(cursor int64) (r store.WatchResponse, ok bool, wake <-chan struct{}, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return r, false, nil, store.ErrClosed
	}
	if cursor < h.compacted {
		return r, false, nil, fmt.Errorf("watcher fell behind: it had reached revision %d and changes up to %d are no longer retained, list again: %w", cursor, h.compacted, store.ErrCompacted)
	}
	i := sort.Search(len(h.log), func(i int) bool { return h.log[i].Revision > cursor })
	if i < len(h.log) {
		return h.log[i], true, nil, nil
	}
	return r, false, h.wake, nil
}

// close ends every watcher and waits for their goroutines.
func (h *hub) close() {
	h.mu.Lock()
	if !h.closed {
		h.closed = true
		close(h.done)
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// watcher is a store.Watcher on the hub.
type watcher struct {
	out chan store.WatchResponse
	mu  sync.Mutex
	err error
}

func (w *watcher) Responses() <-chan store.WatchResponse { return w.out }

func (w *watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *watcher) run(ctx context.Context, h *hub, cursor int64) {
	err := w.loop(ctx, h, cursor)
	w.mu.Lock()
	w.err = err
	w.mu.Unlock()
	close(w.out)
}

func (w *watcher) loop(ctx context.Context, h *hub, cursor int64) error {
	for {
		r, ok, wake, err := h.next(cursor)
		if err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		if !ok {
			select {
			case <-wake:
				continue
			case <-ctx.Done():
				return nil
			case <-h.done:
				return fmt.Errorf("watch: %w", store.ErrClosed)
			}
		}
		select {
		case w.out <- r:
			cursor = r.Revision
		case <-ctx.Done():
			return nil
		case <-h.done:
			return fmt.Errorf("watch: %w", store.ErrClosed)
		}
	}
}

// ---- leadership ----

// Campaign grants the leadership at once unless another caller in this
// process holds it: one process is all a bbolt file can have.
func (s *Store) Campaign(ctx context.Context) (store.Leadership, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case s.leaderSem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.hub.done:
		return nil, fmt.Errorf("campaign: %w", store.ErrClosed)
	}
	l := &leadership{s: s, done: make(chan struct{})}
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.hub.isClosed() {
		l.release()
		return nil, fmt.Errorf("campaign: %w", store.ErrClosed)
	}
	s.leader = l
	return l, nil
}

func (h *hub) isClosed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.closed
}

type leadership struct {
	s    *Store
	once sync.Once
	done chan struct{}
}

func (l *leadership) Done() <-chan struct{} { return l.done }

func (l *leadership) Resign(context.Context) error {
	l.s.lmu.Lock()
	if l.s.leader == l {
		l.s.leader = nil
	}
	l.s.lmu.Unlock()
	l.release()
	return nil
}

func (l *leadership) release() {
	l.once.Do(func() {
		close(l.done)
		<-l.s.leaderSem
	})
}

// endLeadership is Close's: the leadership does not outlive the store.
func (s *Store) endLeadership() {
	s.lmu.Lock()
	l := s.leader
	s.leader = nil
	s.lmu.Unlock()
	if l != nil {
		l.release()
	}
}

// ---- CRL numbers ----

var crlNumberPrefix = []byte("crl_number/")

// NextCRLNumber returns max(floor, previous+1) for caID and persists it; see
// store.Store. It is not gated on write health: CRLs must keep coming while
// the disk is full, like the revocations they carry.
func (s *Store) NextCRLNumber(ctx context.Context, caID string, floor int64) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if caID == "" || floor < 0 {
		return 0, fmt.Errorf("next crl number: empty ca id or negative floor: %w", store.ErrInvalid)
	}
	key := append(append([]byte(nil), crlNumberPrefix...), caID...)
	var n int64
	err := s.updateAlways("next crl number for "+caID, func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		n = floor
		if v := meta.Get(key); len(v) == 8 {
			prev := int64(binary.BigEndian.Uint64(v))
			if prev == math.MaxInt64 {
				return fmt.Errorf("crl number of %s is exhausted", caID)
			}
			n = max(floor, prev+1)
		}
		return meta.Put(key, binary.BigEndian.AppendUint64(nil, uint64(n)))
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}
