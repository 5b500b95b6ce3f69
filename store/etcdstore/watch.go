package etcdstore

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// Watch buffering: responses the consumer has not taken wait in a channel
// of watchChan and a queue of up to watchQueue. When the queue is full the
// etcd watch is cancelled and, once the consumer has drained the queue,
// restarted from the next revision: memory stays bounded and writers never
// wait. Only if etcd has compacted that revision meanwhile does the watch
// end with store.ErrCompacted.
const (
	watchChan  = 16
	watchQueue = 256
)

// Revision is the ModRevision of the watch marker, which every transaction
// changing watched state puts: it moves exactly with watched commits and
// equals the revision of the watch response of the last one.
func (s *Store) Revision(ctx context.Context) (int64, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	resp, err := s.get(ctx, "revision", s.k.marker)
	if err != nil {
		return 0, err
	}
	if len(resp.Kvs) == 0 {
		return 0, nil
	}
	return resp.Kvs[0].ModRevision, nil
}

type watcher struct {
	ch   chan store.WatchResponse
	mu   sync.Mutex
	err  error
	once sync.Once
}

func (w *watcher) Responses() <-chan store.WatchResponse { return w.ch }

func (w *watcher) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *watcher) end(err error) {
	w.once.Do(func() {
		w.mu.Lock()
		w.err = err
		w.mu.Unlock()
		close(w.ch)
	})
}

// watchStart is the etcd revision to watch from for changes after fromRev,
// or an error wrapping store.ErrCompacted. Every watched change is at or
// after the marker's creation, so history before it (compacted or not, and
// whatever other prefixes wrote there) is not needed.
func (s *Store) watchStart(ctx context.Context, fromRev int64) (int64, error) {
	resp, err := s.get(ctx, "watch", s.k.marker)
	if err != nil {
		return 0, err
	}
	cur := resp.Header.Revision
	if len(resp.Kvs) == 0 {
		return max(fromRev, cur) + 1, nil
	}
	start := max(fromRev+1, resp.Kvs[0].CreateRevision)
	if start > cur {
		return start, nil
	}
	if _, err := s.get(ctx, "watch", s.k.marker, clientv3.WithRev(start), clientv3.WithCountOnly()); err != nil {
		if isCompacted(err) || strings.Contains(err.Error(), "required revision has been compacted") {
			return 0, fmt.Errorf("watch from revision %d: %w", fromRev, store.ErrCompacted)
		}
		return 0, err
	}
	return start, nil
}

// Watch streams watched changes after fromRev; see store.Store.
func (s *Store) Watch(ctx context.Context, fromRev int64) (store.Watcher, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	if fromRev < 0 {
		return nil, fmt.Errorf("watch: negative revision %d: %w", fromRev, store.ErrInvalid)
	}
	start, err := s.watchStart(ctx, fromRev)
	if err != nil {
		return nil, err
	}
	w := &watcher{ch: make(chan store.WatchResponse, watchChan)}
	s.wg.Add(1)
	go s.runWatch(ctx, w, start)
	return w, nil
}

func (s *Store) runWatch(ctx context.Context, w *watcher, next int64) {
	defer s.wg.Done()
	var queue []store.WatchResponse
	// send blocks until the consumer takes r; false when the watch ends.
	send := func(r store.WatchResponse) bool {
		select {
		case w.ch <- r:
			return true
		case <-ctx.Done():
			w.end(nil)
		case <-s.ctx.Done():
			w.end(fmt.Errorf("watch: %w", store.ErrClosed))
		}
		return false
	}
	for {
		wctx, wcancel := context.WithCancel(ctx)
		wch := s.cli.Watch(wctx, s.k.w, clientv3.WithPrefix(), clientv3.WithRev(next), clientv3.WithPrevKV())
		full := false
		for !full {
			var out chan store.WatchResponse
			var first store.WatchResponse
			if len(queue) > 0 {
				out, first = w.ch, queue[0]
			}
			select {
			case out <- first:
				queue = queue[1:]
				continue
			case <-ctx.Done():
				wcancel()
				w.end(nil)
				return
			case <-s.ctx.Done():
				wcancel()
				w.end(fmt.Errorf("watch: %w", store.ErrClosed))
				return
			case resp, ok := <-wch:
				if !ok {
					// The client gave the stream up; watch again from
					// where it stopped.
					full = true
					continue
				}
				if resp.CompactRevision != 0 {
					wcancel()
					w.end(fmt.Errorf("watch at revision %d: etcd compacted to %d: %w", next, resp.CompactRevision, store.ErrCompacted))
					return
				}
				if err := resp.Err(); err != nil {
					s.log.Debug("etcd watch interrupted", "revision", next, "err", err)
					// Not at once: a server refusing the watch would
					// otherwise be asked again in a tight loop.
					select {
					case <-time.After(100 * time.Millisecond):
					case <-ctx.Done():
					case <-s.ctx.Done():
					}
					full = true
					continue
				}
				for _, r := range s.split(resp.Events) {
					queue = append(queue, r)
					next = r.Revision + 1
				}
				full = len(queue) >= watchQueue
			}
		}
		wcancel()
		for _, r := range queue {
			if !send(r) {
				return
			}
		}
		queue = nil
	}
}

// split turns an etcd watch response (which may hold several commits) into
// one store.WatchResponse per commit, without the marker.
func (s *Store) split(evs []*clientv3.Event) []store.WatchResponse {
	var out []store.WatchResponse
	for _, e := range evs {
		rev := e.Kv.ModRevision
		if len(out) == 0 || out[len(out)-1].Revision != rev {
			out = append(out, store.WatchResponse{Revision: rev})
		}
		if string(e.Kv.Key) == s.k.marker {
			continue
		}
		ev, ok := s.event(e)
		if !ok {
			continue
		}
		ev.Revision = rev
		out[len(out)-1].Events = append(out[len(out)-1].Events, ev)
	}
	return out
}

func (s *Store) event(e *clientv3.Event) (store.Event, bool) {
	key := string(e.Kv.Key)
	ev := store.Event{Op: store.OpPut}
	val := e.Kv.Value
	if e.Type == mvccpb.DELETE {
		ev.Op = store.OpDelete
		val = nil
		if e.PrevKv != nil {
			val = e.PrevKv.Value
		}
	}
	dec := func(v any) {
		if len(val) > 0 {
			if err := unmarshal(val, v); err != nil {
				s.log.Warn("undecodable value in watch", "key", key, "err", err)
			}
		}
	}
	switch {
	case strings.HasPrefix(key, s.k.entry):
		ev.Kind, ev.Key = store.KindEntry, key[len(s.k.entry):]
		ev.Entry = &store.Entry{ID: ev.Key}
		dec(ev.Entry)
	case strings.HasPrefix(key, s.k.ca):
		ev.Kind, ev.Key = store.KindCA, key[len(s.k.ca):]
		ev.CA = &store.CARecord{ID: ev.Key}
		dec(ev.CA)
	case strings.HasPrefix(key, s.k.revoked):
		ev.Kind, ev.Key = store.KindRevoked, key[len(s.k.revoked):]
		ev.Revoked = &store.RevokedSerial{Serial: ev.Key}
		dec(ev.Revoked)
	case strings.HasPrefix(key, s.k.token):
		ev.Kind, ev.Key = store.KindToken, key[len(s.k.token):]
		ev.Token = &store.JoinToken{Hash: ev.Key}
		dec(ev.Token)
	case key == s.k.crls:
		ev.Kind = store.KindCRLs
		ev.CRLs = &store.SignedCRLs{}
		dec(ev.CRLs)
		ev.CRLs.DER, ev.CRLs.Covers = nil, "" // see store.KindCRLs
	case strings.HasPrefix(key, s.k.agent):
		ev.Kind, ev.Key = store.KindAgent, key[len(s.k.agent):]
		ev.Agent = &store.AgentRecord{ID: ev.Key}
		dec(ev.Agent)
	default:
		return ev, false
	}
	return ev, true
}
