package boltstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/meshid/meshid/store"
)

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
//
// Watched writes (commitWatched: entries, tokens, agents, CAs,
// revocations) join the same queue, so that e.g. a thousand agents
// attesting at once share fsyncs too; see commitGroup.
type svidReq struct {
	serial []byte
	idxKey []byte
	val    []byte
	state  reqState
	gated  bool       // refused while the store is unhealthy
	err    error      // set by the committer inside the transaction
	done   chan error // buffered: the committer never blocks on a caller

	// A watched write, when fn is set (serial, idxKey and val are then
	// unused): op names it in errors, ch and rev are its changes and
	// their revision once committed.
	op  string
	fn  func(*bolt.Tx, *changes) error
	ch  changes
	rev int64
	// resetWatch marks an Import: it takes a revision of its own but
	// publishes no events; the watch log is reset to it instead (see
	// hub.reset).
	resetWatch bool
}

// opName names r in the errors it gets.
func (r *svidReq) opName() string {
	if r.fn != nil {
		return r.op
	}
	return "record svid " + string(r.serial)
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
		gated:  true,
		done:   make(chan error, 1),
	}
	if err := s.enqueue(r); err != nil {
		return fmt.Errorf("record svid %s: %w", rec.Serial, err)
	}

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

// commit answers every request of batch, in as few bbolt transactions as
// it can: one, unless a watched write's fn fails (see commitGroup).
func (s *Store) commit(batch []*svidReq) {
	// Rows queued before the store went unhealthy are refused like new ones:
	// one failed commit is enough to know the disk is not taking writes.
	// Ungated writes (a ban, a revocation) still go to the disk.
	if herr := s.Health(); herr != nil {
		live := batch[:0]
		for _, r := range batch {
			if r.gated {
				r.done <- fmt.Errorf("%s: %w", r.opName(), herr)
				continue
			}
			live = append(live, r)
		}
		batch = live
	}
	for len(batch) > 0 {
		batch = batch[s.commitGroup(batch):]
	}
}

// errGroupMemberFailed rolls a group's transaction back when one watched
// write's fn refused; it never reaches a caller.
var errGroupMemberFailed = errors.New("a group member failed")

// commitGroup writes batch in one bbolt transaction, in order, and answers
// the requests it is done with; it returns how many, always at least one.
//
// An inventory row that is a duplicate fails alone (nothing is written for
// it). A watched write's fn that returns an error may have written part of
// what it meant to, and bbolt has no savepoint, so the transaction is
// rolled back: the requests before it are committed again on their own
// (their fns run again, on the same state: the Store's fns may run more
// than once), and the failed one comes first in the next group, where its
// error, on that same state, is its answer.
func (s *Store) commitGroup(batch []*svidReq) int {
	s.commits.Add(1)
	if h := s.beforeCommit; h != nil {
		h()
	}
	failAt, failErr := -1, error(nil)
	var fnErr error
	err := s.db.Update(func(tx *bolt.Tx) error {
		svids, idx := tx.Bucket(bucketSVIDs), tx.Bucket(bucketSVIDExpiry)
		idx.FillPercent = expiryFillPercent
		meta := tx.Bucket(bucketMeta)
		rev0 := readRevision(meta)
		rev := rev0
		for i, r := range batch {
			r.err = nil
			if r.fn != nil {
				r.ch = changes{}
				if err := r.fn(tx, &r.ch); err != nil {
					failAt, failErr = i, err
					return errGroupMemberFailed
				}
				if len(r.ch.events) > 0 || r.resetWatch {
					// One revision per request, as if each had its own
					// commit: a watcher cannot tell the groups apart.
					rev++
					r.rev = rev
					for j := range r.ch.events {
						r.ch.events[j].Revision = rev
					}
				}
				continue
			}
			// Also catches a duplicate earlier in the same group: its Put is
			// visible to this Get.
			if svids.Get(r.serial) != nil {
				r.err = fmt.Errorf("record svid %s: %w", r.serial, store.ErrAlreadyExists)
				continue
			}
			if err := putInventoryRow(svids, idx, r.serial, r.idxKey, r.val); err != nil {
				fnErr = err
				return err
			}
		}
		if rev == rev0 {
			return nil
		}
		return meta.Put(keyRevision, binary.BigEndian.AppendUint64(nil, uint64(rev)))
	})
	switch {
	case failAt == 0:
		// Its error is the state's answer: nothing was written for it.
		r := batch[0]
		r.done <- wrapTxErr(r.op, failErr)
		return 1
	case failAt > 0:
		return s.commitGroup(batch[:failAt])
	case err != nil && fnErr == nil && !errors.Is(err, berrors.ErrDatabaseNotOpen):
		// The commit itself failed (a write or an fsync): nobody's
		// request is durable.
		err = s.commitFailed("group commit", err)
	}
	for _, r := range batch {
		if err != nil {
			r.done <- fmt.Errorf("%s: %w", r.opName(), wrapTxErr("group commit", err))
			continue
		}
		if r.resetWatch {
			s.hub.reset(r.rev)
		} else if len(r.ch.events) > 0 {
			// Published before the caller hears back, in commit order:
			// only this goroutine publishes.
			s.hub.publish(store.WatchResponse{Revision: r.rev, Events: r.ch.events})
		}
		r.done <- r.err
	}
	return len(batch)
}

// commitWatched runs fn in a write transaction, shared with the other
// writes queued at the same time (the group commit above), and if fn
// recorded changes gives them the next revision and publishes them before
// it returns. gated writes are refused while the store is unhealthy; the
// others (revocations, deletions, bans) are always attempted. It waits for
// the outcome whatever its caller's context does: an error always means
// "not written".
func (s *Store) commitWatched(op string, gated bool, fn func(*bolt.Tx, *changes) error) error {
	if gated {
		if err := s.Health(); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	r := &svidReq{op: op, fn: fn, gated: gated, done: make(chan error, 1)}
	if err := s.enqueue(r); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return <-r.done
}

// enqueue hands r to the committer.
func (s *Store) enqueue(r *svidReq) error {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.qclosed {
		return store.ErrClosed
	}
	s.queue = append(s.queue, r)
	s.qcond.Signal()
	return nil
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
