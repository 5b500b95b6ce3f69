package controlplane

import (
	"context"
	"sync"
	"time"
)

// tasks owns everything the server runs outside an RPC: the watch that
// feeds its memory from the store, the leadership campaign, and the
// callbacks of its timers (CA lifecycle, CRL maintenance, inventory
// prune). Open starts them; Close cancels ctx, which every one of them
// runs under, and waits for them, so nothing touches the store after it
// is closed.
//
// Timer callbacks run on the timer's goroutine (a fake clock runs them
// inside Advance, which keeps tests in fake time deterministic), but only
// through enter/leave, so Close also waits for one in flight and none
// starts after it.
type tasks struct {
	ctx    context.Context
	cancel context.CancelFunc
	after  func(time.Duration, func()) func() bool

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func newTasks(after func(time.Duration, func()) func() bool) *tasks {
	ctx, cancel := context.WithCancel(context.Background())
	return &tasks{ctx: ctx, cancel: cancel, after: after}
}

// enter registers a task about to run; false once the group is closed.
func (t *tasks) enter() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.wg.Add(1)
	return true
}

func (t *tasks) leave() { t.wg.Done() }

// goFn runs fn on a goroutine of the group.
func (t *tasks) goFn(fn func(ctx context.Context)) {
	if !t.enter() {
		return
	}
	go func() {
		defer t.leave()
		fn(t.ctx)
	}()
}

// close cancels the group's context and waits for every task.
func (t *tasks) close() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.cancel()
	t.wg.Wait()
}

// sleep waits d on the injected clock, or until ctx ends; false if ctx
// ended first.
func (t *tasks) sleep(ctx context.Context, d time.Duration) bool {
	ch := make(chan struct{})
	stop := t.after(d, func() { close(ch) })
	defer stop()
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	}
}

// timer is one re-armable timer whose callback runs as a task of the
// group, under the group's context.
type timer struct {
	t  *tasks
	fn func(ctx context.Context)

	mu   sync.Mutex
	stop func() bool
}

func (t *tasks) newTimer(fn func(ctx context.Context)) *timer {
	return &timer{t: t, fn: fn}
}

// reset (re)arms the timer to fire after d, replacing any earlier arming.
func (tm *timer) reset(d time.Duration) {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	if tm.stop != nil {
		tm.stop()
		tm.stop = nil
	}
	tm.t.mu.Lock()
	closed := tm.t.closed
	tm.t.mu.Unlock()
	if closed {
		return
	}
	tm.stop = tm.t.after(max(d, 0), func() {
		if !tm.t.enter() {
			return
		}
		defer tm.t.leave()
		tm.fn(tm.t.ctx)
	})
}

// cancel disarms the timer.
func (tm *timer) cancel() {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	if tm.stop != nil {
		tm.stop()
		tm.stop = nil
	}
}
