package controlplane

import (
	"context"
	"sync"
	"time"

	"github.com/meshid/meshid/store"
)

// CA lifecycle transitions (prepare, activate, emergency rotation) are
// decisions about state every replica shares: two replicas taking them at
// once would each make a CA. So only the holder of the store's leadership
// takes them; on bbolt, where one process owns the store, that is always
// this server.

// lead holds the leadership for as long as the store grants it, and
// campaigns again when it is lost, until ctx ends. first is a leadership
// already taken (by bootstrap), or nil.
func (s *Server) lead(ctx context.Context, first store.Leadership) {
	l := first
	for {
		if l == nil {
			var err error
			if l, err = s.store.Campaign(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				s.log.Error("campaign for leadership failed; retrying", "err", err)
				if !s.tasks.sleep(ctx, time.Second) {
					return
				}
				continue
			}
		}
		if l != first {
			s.takeOver(ctx)
		}
		s.leader.set(true)
		s.log.Debug("leading: this server runs the CA lifecycle")
		// The CRLs every replica serves are the leader's now: store the
		// set this server serves, or sign one, if the store's is not it.
		if err := s.publishBundles(); err != nil {
			s.log.Error("publish bundles on taking the leadership", "err", err)
		}
		s.scheduleRotation() // a step may have fallen due while another led
		select {
		case <-ctx.Done():
			s.leader.set(false)
			_ = l.Resign(context.Background())
			return
		case <-l.Done():
			s.leader.set(false)
			s.log.Warn("lost leadership: another replica runs the CA lifecycle now")
			l = nil
		}
	}
}

// takeOver readies a server that has just won the leadership from another
// replica: its projection first catches up with everything the old leader
// wrote (so it never prepares a second CA beside one it has not seen
// yet), then a rotation the old leader left half done is finished.
func (s *Server) takeOver(ctx context.Context) {
	if err := s.synced(ctx); err != nil {
		s.log.Error("taking over the leadership: catching up with the store failed", "err", err)
		return
	}
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		s.log.Error("taking over the leadership: load CAs", "err", err)
		return
	}
	if _, err := s.repairActivation(ctx, recs); err != nil {
		s.log.Error("taking over the leadership", "err", err)
	}
}

// leaderWait bounds how long a lifecycle request waits for this server to
// lead: at start-up the campaign may not have finished yet.
const leaderWait = 2 * time.Second

// leaderState says whether this server leads, and wakes those waiting
// for it to.
type leaderState struct {
	mu      sync.Mutex
	leading bool
	up      chan struct{} // closed while leading
}

func (l *leaderState) set(leading bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.up == nil {
		l.up = make(chan struct{})
	}
	switch {
	case leading && !l.leading:
		close(l.up)
	case !leading && l.leading:
		l.up = make(chan struct{})
	}
	l.leading = leading
}

func (l *leaderState) get() (bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.up == nil {
		l.up = make(chan struct{})
	}
	return l.leading, l.up
}

// Leading reports whether this server holds the store's leadership and so
// runs the CA lifecycle.
func (s *Server) Leading() bool {
	ok, _ := s.leader.get()
	return ok
}

// requireLeader is nil once this server leads, or FailedPrecondition if it
// does not within leaderWait.
func (s *Server) requireLeader(ctx context.Context) error {
	ok, up := s.leader.get()
	if ok {
		return nil
	}
	t := time.NewTimer(leaderWait) // a bound on an RPC: wall time
	defer t.Stop()
	select {
	case <-up:
		return nil
	case <-ctx.Done():
	case <-t.C:
	}
	return &FailedPreconditionError{msg: "this server is not the leader: another replica runs the CA lifecycle; send CA requests to it"}
}
