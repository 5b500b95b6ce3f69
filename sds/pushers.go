package sds

import (
	"runtime"
	"sync"
)

// Every response on a stream is built and sent by one of a few pusher
// goroutines shared by the whole server, not by the stream's own
// goroutines. An idle stream holds two goroutines (its handler, parked in
// a select, and the one parked in Recv); neither ever runs the deep
// marshal and Send path, so their stacks stay at their starting size
// instead of each growing for a Send and then idling at twice that. Only
// the pushers' stacks grow, and there are few of them.
//
// A stream is queued at most once at a time; a pusher takes it and runs its
// push under the stream's mutex, which also guards the stream's state and
// keeps one Send at a time per stream. A handler marks its stream closed
// (under that mutex, so after any Send in progress) before it returns, and
// a closed stream is never sent on.

// pushJob is a stream with something to push.
type pushJob interface {
	// runPush sends what the stream's state calls for, if anything.
	runPush()
	// queuedFlag is the stream's "in the queue" mark, guarded by Server.qmu.
	queuedFlag() *bool
}

// pushers returns the size of the pool: enough that a few clients blocked
// in Send (flow control) cannot stall every other stream.
func pushers() int { return max(32, 4*runtime.GOMAXPROCS(0)) }

// pushQueue is the server's FIFO of streams to push to and the pool that
// drains it. The pool starts with the first stream and stops at Shutdown.
type pushQueue struct {
	mu      sync.Mutex
	cond    sync.Cond
	q       []pushJob
	head    int
	started bool
	closed  bool
}

// enqueue queues j unless it is queued already. After Shutdown it does
// nothing: the stream is ending.
func (p *pushQueue) enqueue(j pushJob) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	q := j.queuedFlag()
	if *q {
		return
	}
	*q = true
	if !p.started {
		p.started = true
		p.cond.L = &p.mu
		for range pushers() {
			go p.work()
		}
	}
	p.q = append(p.q, j)
	p.cond.Signal()
}

// close stops the pool: each pusher returns once its current push (if
// any) is done. Queued jobs are dropped; their streams are ending.
func (p *pushQueue) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	clear(p.q)
	p.q, p.head = nil, 0
	if p.started {
		p.cond.Broadcast()
	}
}

func (p *pushQueue) work() {
	for {
		p.mu.Lock()
		for !p.closed && p.head == len(p.q) {
			p.cond.Wait()
		}
		if p.closed {
			p.mu.Unlock()
			return
		}
		j := p.q[p.head]
		p.q[p.head] = nil
		p.head++
		if p.head == len(p.q) {
			p.q, p.head = p.q[:0], 0
		}
		*j.queuedFlag() = false // a change from here on queues it again
		p.mu.Unlock()
		j.runPush()
	}
}
