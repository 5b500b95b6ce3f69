package boltstore

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"

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
