package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/meshid/meshid/store"
)

// leadership is one won election: its own session (lease), so that losing
// it (the lease expired while this replica was cut off) or resigning ends
// exactly this leadership.
type leadership struct {
	s    *Store
	sess *concurrency.Session
	el   *concurrency.Election
	key  string
	rev  int64 // the election key's CreateRevision: the fencing token
	done chan struct{}
	once sync.Once
	stop chan struct{}
}

func (l *leadership) Done() <-chan struct{} { return l.done }

// Resign deletes the election key and revokes the lease; idempotent.
func (l *leadership) Resign(ctx context.Context) error {
	var err error
	l.once.Do(func() {
		close(l.stop)
		if rerr := l.el.Resign(ctx); rerr != nil && !errors.Is(rerr, concurrency.ErrElectionNotLeader) {
			err = fmt.Errorf("resign: %w", rerr)
		}
		l.release()
	})
	return err
}

// release ends the leadership locally: fencing stops at once, the lease
// is revoked (best effort: it expires anyway) and the next Campaign in this
// store may run.
func (l *leadership) release() {
	l.s.lmu.Lock()
	if l.s.lead == l {
		l.s.lead = nil
	}
	l.s.lmu.Unlock()
	_ = l.sess.Close()
	close(l.done)
	<-l.s.leaderSem
}

// monitor ends the leadership when the session's lease is lost.
func (l *leadership) monitor() {
	defer l.s.wg.Done()
	select {
	case <-l.sess.Done():
		l.s.log.Warn("lost the store leadership: lease expired", "replica", l.s.opts.Replica)
		l.once.Do(func() { close(l.stop); l.release() })
	case <-l.stop:
	}
}

func (s *Store) leading() bool {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	return s.lead != nil
}

// fence is the compare every leader-only write carries.
func (s *Store) fence() clientv3.Cmp {
	s.lmu.Lock()
	l := s.lead
	s.lmu.Unlock()
	if l != nil {
		return clientv3.Compare(clientv3.CreateRevision(l.key), "=", l.rev)
	}
	// Nobody campaigns: no leader to race with.
	return clientv3.Compare(clientv3.CreateRevision(s.k.election), "=", 0).WithPrefix()
}

// Campaign blocks until this store leads (a concurrency.Election on a
// fresh session with a LeaseTTL lease, campaign value Options.Replica) or
// ctx ends. One Leadership per store at a time, like boltstore.
func (s *Store) Campaign(ctx context.Context) (store.Leadership, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	select {
	case s.leaderSem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.ctx.Done():
		return nil, fmt.Errorf("campaign: %w", store.ErrClosed)
	}
	ttl := int(math.Ceil(s.opts.LeaseTTL.Seconds()))
	sctx, cancel := s.rctx(ctx)
	lease, err := s.cli.Grant(sctx, int64(ttl))
	cancel()
	if err != nil {
		<-s.leaderSem
		return nil, s.fail(ctx, "campaign", err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(ttl), concurrency.WithContext(s.ctx))
	if err != nil {
		<-s.leaderSem
		return nil, s.fail(ctx, "campaign", err)
	}
	el := concurrency.NewElection(sess, s.k.election)
	if err := el.Campaign(ctx, s.opts.Replica); err != nil {
		_ = sess.Close()
		<-s.leaderSem
		if s.closed.Load() {
			return nil, fmt.Errorf("campaign: %w", store.ErrClosed)
		}
		return nil, s.fail(ctx, "campaign", err)
	}
	l := &leadership{s: s, sess: sess, el: el, key: el.Key(), rev: el.Rev(), done: make(chan struct{}), stop: make(chan struct{})}
	s.lmu.Lock()
	if s.closed.Load() {
		s.lmu.Unlock()
		_ = l.Resign(context.Background())
		return nil, fmt.Errorf("campaign: %w", store.ErrClosed)
	}
	s.lead = l
	s.lmu.Unlock()
	s.wg.Add(1)
	go l.monitor()
	s.log.Info("leading the store", "replica", s.opts.Replica, "revision", l.rev)
	return l, nil
}
