package sds

import (
	"context"
	"runtime"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/meshid/meshid/identity"
)

// How a stream's work is spread over goroutines, to keep an idle stream
// small.
//
// An idle stream holds two goroutines: its handler, parked in a select
// (the end of the server, the end of the stream, a change), and recvLoop,
// parked in Recv. Goroutine stacks only grow (a stack shrinks only when a
// quarter of it is in use at a GC, which a goroutine parked under gRPC's
// frames never gets to), so each of them would keep whatever its deepest
// call needed, long after. Neither of them makes a deep call:
//
//   - The handler subscribes (authentication, entitlements, maybe minting)
//     on a short-lived goroutine of its own, see subscribeApart.
//   - recvLoop receives each request undecoded, as the unknown fields of an
//     Empty (a flat copy of the bytes), see decode.
//   - Everything else (decoding a request, updating the stream's state,
//     marshalling and sending a response) runs on one of a few pusher
//     goroutines shared by the whole server. Only their stacks grow. The
//     exception is a Send that might wait for its client to read (see
//     writeBudget): it runs on a short-lived goroutine of the stream's.
//
// A stream is queued at most once at a time; a pusher takes it and runs
// its runPush under the stream's mutex, which also guards the stream's
// state; that and the sending mark keep one Send at a time per stream.
// recvLoop waits until its request has been taken before it receives the
// next one, so a client cannot queue requests faster than they are
// handled. A handler marks its stream closed (under that mutex, so after
// any Send on a pusher) and waits for a Send apart before it returns, and
// a closed stream is never sent on.

// maxUnacked bounds the responses a stream may have in flight without an
// answer (ACK or NACK) to the latest. Envoy answers every response, so it
// never gets near it; a client that stops reading is sent nothing more
// until it answers.
const maxUnacked = 3

// A pusher must never wait on a client, or a local process that stops
// reading could stall every stream. A Send waits when the stream's write
// quota is used up: gRPC gives each stream writeBudget bytes (grpc-go's
// defaultWriteQuota, not configurable), takes a message's bytes from it on
// Send and gives them back only as they go out on the wire, which the
// client's flow-control window lets them do only as it reads. Every byte of
// a response the client has answered (ACK or NACK of the latest) has gone
// out, so what is taken and not given back is at most the bytes of the
// unanswered responses. A Send whose bytes, with those, fit writeBudget
// therefore cannot wait, whatever window the client announced (even none):
// it runs on the pusher. Any other (a bundle of many CRLs, or the third
// 30 KiB response to a client that does not read) may wait for the client,
// so it runs on a goroutine of the stream's own (see send), and only that
// stream waits; the stream sends nothing else until it returns.
//
// Envoy answers each response before the next change, so its responses
// below writeBudget all go out on the pushers, as before; a bigger one
// costs a short-lived goroutine per push, whose stack goes with it.
const (
	writeBudget  = 64 << 10
	msgHeaderLen = 5 // gRPC's length prefix, taken from the quota too
)

// pushJob is a stream with something to push.
type pushJob interface {
	// runPush sends what the stream's state calls for, if anything.
	runPush()
	// queuedFlag is the stream's "in the queue" mark, guarded by Server.pq.mu.
	queuedFlag() *bool
}

// pushers returns the size of the pool. A pusher's Send never waits for a
// client (see writeBudget), but it does the marshalling and the copy into
// the transport, so a few run at once.
func pushers() int { return max(32, 4*runtime.GOMAXPROCS(0)) }

// pushQueue is the server's FIFO of streams to push to and the pool that
// drains it. The pool starts with the first stream and stops at Shutdown,
// which waits for it (workers counts the pushers running).
type pushQueue struct {
	mu      sync.Mutex
	cond    sync.Cond
	q       []pushJob
	head    int
	started bool
	closed  bool
	workers sync.WaitGroup
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
			p.workers.Go(p.work)
		}
	}
	p.q = append(p.q, j)
	p.cond.Signal()
}

// close stops the pool: each pusher returns once its current push (if
// any) is done; wait waits for that. Queued jobs are dropped; their
// streams are ending.
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

// wait returns once every pusher has returned; call it after close. A
// pusher's push never waits for a client (see writeBudget), so this is
// bounded by one push.
func (p *pushQueue) wait() { p.workers.Wait() }

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
		} else if p.head >= 1024 && 2*p.head >= len(p.q) {
			// Never drained: drop the taken half rather than let append
			// carry it along.
			n := copy(p.q, p.q[p.head:])
			clear(p.q[n:])
			p.q, p.head = p.q[:n], 0
		}
		*j.queuedFlag() = false // a change from here on queues it again
		p.mu.Unlock()
		j.runPush()
	}
}

// streamBase is what both stream kinds share.
type streamBase struct {
	s      *Server
	caller identity.Caller
	sub    identity.Subscription
	errc   chan error    // to the handler: recvLoop's error or a pushFailed, whichever is first
	taken  chan struct{} // to recvLoop: a pusher has taken its request
	queued bool          // in the push queue; guarded by s.pq.mu

	mu           sync.Mutex
	closed       bool           // the handler has returned (or a push failed): never send again
	unacked      int            // responses sent since the client last answered the latest one
	unackedBytes int            // their size on the wire (see writeBudget)
	sending      bool           // a Send runs apart (see send): no other until it returns
	req          *emptypb.Empty // the request recvLoop left, undecoded
	refusedN     map[string]bool
	hold         bundleHold // which bundle the client holds (bundleversions.go)

	// apart is the Send running on a goroutine of its own, if any; the
	// handler waits for it before it returns.
	apart sync.WaitGroup
}

func (b *streamBase) init(s *Server, caller identity.Caller, sub identity.Subscription) {
	b.s, b.caller, b.sub = s, caller, sub
	b.errc = make(chan error, 1)
	b.taken = make(chan struct{}, 1)
	s.tracked.add(&b.hold)
}

func (b *streamBase) queuedFlag() *bool { return &b.queued }

// report hands err to the handler, unless an error is there already: the
// stream ends anyway.
func (b *streamBase) report(err error) {
	select {
	case b.errc <- err:
	default:
	}
}

// pushFailed carries a failed push (a bad request, encode or Send) from a
// pusher to the stream's handler, which ends the stream with it.
type pushFailed struct{ err error }

func (p pushFailed) Error() string { return p.err.Error() }

// fail ends the stream after a failed push. b.mu is held.
func (b *streamBase) fail(err error) {
	b.closed = true
	b.report(pushFailed{err})
}

// close marks the stream closed once any Send in progress is done; the
// handler calls it before it returns, as gRPC requires. A Send running
// apart may be waiting for a client that does not read: it returns when
// the client reads, resets the stream or goes away, or when the server's
// drain deadline closes the connection, and so does close.
func (b *streamBase) close() {
	b.mu.Lock()
	b.closed = true
	b.req = nil
	b.mu.Unlock()
	b.s.tracked.remove(&b.hold)
	b.apart.Wait()
}

// answered records that the client has answered the latest response: all
// that was sent has gone out. b.mu is held.
func (b *streamBase) answered() {
	b.unacked, b.unackedBytes = 0, 0
}

// held reports whether a push must wait: too many responses unanswered,
// or a Send still running apart. It goes out with the client's next answer
// or when that Send returns. b.mu is held.
func (b *streamBase) held() bool {
	return b.unacked >= maxUnacked || b.sending
}

// send sends m with sendMsg (the stream's Send of m): on this pusher if
// it cannot wait (see writeBudget), else on a goroutine of its own, which
// queues the stream again once done so that a push held meanwhile goes
// out. Either way m counts as sent from here on: its nonce is the latest,
// and a client may answer it before a Send apart has returned. b.mu is
// held and b is not closed.
func (b *streamBase) send(m proto.Message, sendMsg func() error, self pushJob) error {
	n := proto.Size(m) + msgHeaderLen
	inline := b.unackedBytes+n <= writeBudget
	b.unacked++
	b.unackedBytes += n
	if inline {
		if err := sendMsg(); err != nil {
			return err
		}
		b.s.metrics.Pushes.Inc()
		return nil
	}
	b.sending = true
	b.apart.Add(1)
	b.s.metrics.LargeSends.Inc()
	go func() {
		defer b.apart.Done()
		err := sendMsg()
		b.s.metrics.LargeSends.Dec()
		b.mu.Lock()
		b.sending = false
		if err != nil {
			b.fail(err)
		} else {
			b.s.metrics.Pushes.Inc()
		}
		closed := b.closed
		b.mu.Unlock()
		if !closed {
			b.s.pq.enqueue(self)
		}
	}()
	return nil
}

// recvLoop hands each request, undecoded, to the pushers (through the
// stream's queue entry self) and waits until one has taken it. It ends
// when the stream fails or ctx (the handler's) ends.
func (b *streamBase) recvLoop(ctx context.Context, stream grpc.ServerStream, self pushJob) {
	for {
		raw := &emptypb.Empty{}
		if err := stream.RecvMsg(raw); err != nil {
			b.report(err)
			return
		}
		b.mu.Lock()
		b.req = raw
		b.mu.Unlock()
		b.s.pq.enqueue(self)
		select {
		case <-b.taken:
		case <-ctx.Done():
			return
		}
	}
}

// takeRequest returns the request recvLoop left, if any, and lets it
// receive the next. b.mu is held.
func (b *streamBase) takeRequest() *emptypb.Empty {
	raw := b.req
	if raw == nil {
		return nil
	}
	b.req = nil
	select {
	case b.taken <- struct{}{}:
	default:
	}
	return raw
}

// decode turns a request received as an Empty into m. Every field of the
// request is an unknown field of Empty, kept as its exact bytes, so this is
// the decoding gRPC would have done, only on the pusher's stack.
func decode(raw *emptypb.Empty, m proto.Message) error {
	if err := proto.Unmarshal(raw.ProtoReflect().GetUnknown(), m); err != nil {
		return status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", err)
	}
	return nil
}

// refusedNames is the set of names already logged as refused. b.mu is
// held.
func (b *streamBase) refusedNames() map[string]bool {
	if b.refusedN == nil {
		b.refusedN = map[string]bool{}
	}
	return b.refusedN
}

// subscribeApart runs subscribe (authentication, entitlements, perhaps
// minting: the deepest calls a stream makes) on a goroutine of its own and
// waits for it, so that the handler's stack does not grow for it and then
// idle at that size for the life of the stream.
func (s *Server) subscribeApart(ctx context.Context) (identity.Caller, identity.Subscription, error) {
	type result struct {
		caller identity.Caller
		sub    identity.Subscription
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		var r result
		r.caller, r.sub, r.err = s.subscribe(ctx)
		ch <- r
	}()
	r := <-ch
	return r.caller, r.sub, r.err
}

// waitLoop is a stream handler's life once set up: it waits for the end of
// the server or of the stream, and hands changes to the pushers (nothing
// is sent before the first request; runPush checks).
func (b *streamBase) waitLoop(self pushJob) error {
	for {
		select {
		case <-b.s.done:
			return nil
		case err := <-b.errc:
			return streamEnd(err)
		case <-b.sub.Changed():
			if err := ended(b.sub); err != nil {
				return err
			}
			b.s.pq.enqueue(self)
		}
	}
}

// nextRequest decodes the request recvLoop left into req and checks its
// type. It reports false if there was none, or if it was bad, in which
// case the stream is failed (and closed). b.mu is held.
func (b *streamBase) nextRequest(req interface {
	proto.Message
	GetTypeUrl() string
}) bool {
	raw := b.takeRequest()
	if raw == nil {
		return false
	}
	if err := decode(raw, req); err != nil {
		b.fail(err)
		return false
	}
	if err := checkType(req.GetTypeUrl()); err != nil {
		b.fail(err)
		return false
	}
	return true
}

// ended is PermissionDenied once the source has ended sub: the credential
// the caller authenticated with (or the identity it held) was revoked.
func ended(sub identity.Subscription) error {
	e, ok := sub.(interface{ Err() error })
	if !ok {
		return nil
	}
	if err := e.Err(); err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	return nil
}
