package boltstore

// Write health: fail-stop with recovery.
//
// A commit that fails (a write or an fsync returning an error) may have left
// nothing durable, so the store must never report success for what was in
// it, and the next writes are unlikely to fare better. The store therefore
// goes unhealthy on the first failed commit: it logs at ERROR once, Health
// returns an error wrapping store.ErrUnavailable, and every write that adds
// something (RecordSVID, entries, tokens, CAs, audit events) is refused with
// that error without touching the disk. Reads are unaffected.
//
// What happens next depends on the failure:
//
//   - ENOSPC or EDQUOT (a full disk or quota): bbolt writes the data pages
//     before the meta page, and only the data pages need new blocks, so such
//     a commit fails before its meta page is written and bbolt's rollback
//     leaves the file exactly as the previous commit left it. Recovery is
//     safe: a prober tries a write of probeBytes every probeInterval, and
//     once one commits (space was freed) the store is healthy again,
//     without a restart.
//   - anything else (EIO from fsync, typically): after a failed fsync the
//     kernel may hold pages in its cache that never reached the disk and
//     will not be retried, so later commits could build on data that is not
//     there. The store stays unhealthy until the process restarts and reads
//     the file afresh.
//
// A failed commit's rows may still become visible if the failure came after
// bbolt's meta page reached the page cache (an fsync error). That is the
// harmless direction: the caller was told "not recorded" and hands out
// nothing, so an inventory row may exist for a certificate nobody holds,
// never the other way round.

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

const (
	defaultProbeInterval = time.Second
	// probeBytes is what a probe writes (and then deletes). It is bigger than
	// any group commit's dirty pages normally are, so that a probe does not
	// succeed in the last free pages of the file while real writes would
	// still fail, which would flap the store between healthy and not.
	probeBytes = 256 << 10
)

var keyWriteProbe = []byte("write_probe")

// writeFailure is why the store stopped taking writes.
type writeFailure struct {
	op          string
	cause       error
	at          time.Time
	recoverable bool
}

func (f *writeFailure) error() error {
	next := "writes resume by themselves once a probe write commits (free disk space)"
	if !f.recoverable {
		next = "restart the server once the disk is fixed"
	}
	return fmt.Errorf("%w: %s failed at %s: %v; %s", store.ErrUnavailable, f.op, f.at.UTC().Format(time.RFC3339), f.cause, next)
}

// Health returns nil while the store can make writes durable, otherwise an
// error wrapping store.ErrUnavailable that says why and what brings it back.
func (s *Store) Health() error {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.health == nil {
		return nil
	}
	return s.health.error()
}

// commitFailed records a failed commit of op and returns the error its
// caller reports (wrapping store.ErrUnavailable).
func (s *Store) commitFailed(op string, cause error) error {
	s.hmu.Lock()
	if s.health == nil {
		s.health = &writeFailure{
			op:          op,
			cause:       cause,
			at:          time.Now(),
			recoverable: errors.Is(cause, syscall.ENOSPC) || errors.Is(cause, syscall.EDQUOT),
		}
		s.log.Error("store write failed; refusing writes until the store can write again",
			"path", s.path, "op", op, "err", cause, "recovers_without_restart", s.health.recoverable)
		select {
		case s.probeKick <- struct{}{}:
		default:
		}
	}
	s.hmu.Unlock()
	return fmt.Errorf("%w: %w", store.ErrUnavailable, cause)
}

// probeLoop is the prober goroutine started by Open: while the store is
// unhealthy after a recoverable failure it tries a write every
// probeInterval. It stops when Close closes probeStop.
func (s *Store) probeLoop() {
	defer close(s.probeDone)
	t := time.NewTimer(s.probeInterval)
	t.Stop()
	for {
		s.hmu.Lock()
		waiting := s.health != nil && s.health.recoverable
		s.hmu.Unlock()
		if waiting {
			t.Reset(s.probeInterval)
		}
		select {
		case <-s.probeStop:
			t.Stop()
			return
		case <-s.probeKick:
			t.Stop()
			continue
		case <-t.C:
		}
		s.probe()
	}
}

// probe writes probeBytes and deletes them again; if both commit, the store
// is healthy again.
func (s *Store) probe() {
	err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(keyWriteProbe, make([]byte, probeBytes))
	})
	if err == nil {
		err = s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keyWriteProbe) })
	}
	if err != nil {
		s.log.Debug("store write probe failed", "path", s.path, "err", err)
		return
	}
	s.hmu.Lock()
	f := s.health
	s.health = nil
	s.hmu.Unlock()
	if f != nil {
		s.log.Warn("store writes recovered", "path", s.path, "unavailable_for", time.Since(f.at).Round(time.Millisecond), "first_failure", f.cause)
	}
}
