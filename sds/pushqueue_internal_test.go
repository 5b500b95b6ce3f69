package sds

import (
	"testing"
	"time"
)

// blockingJob is a push that holds its pusher until release is closed.
type blockingJob struct {
	queued           bool
	started, release chan struct{}
}

func (j *blockingJob) runPush()          { close(j.started); <-j.release }
func (j *blockingJob) queuedFlag() *bool { return &j.queued }

// TestShutdownWaitsForPushers: after close, wait returns only once the
// push in flight has finished and every pusher has returned, so Shutdown
// leaves no goroutine of the pool behind.
func TestShutdownWaitsForPushers(t *testing.T) {
	var p pushQueue
	j := &blockingJob{started: make(chan struct{}), release: make(chan struct{})}
	p.enqueue(j)
	select {
	case <-j.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the push never started")
	}
	done := make(chan struct{})
	go func() {
		p.close()
		p.wait()
		close(done)
	}()
	// A short look: it can only miss a bug, not invent one.
	select {
	case <-done:
		t.Fatal("wait returned while a push was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(j.release)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not return after the push finished")
	}
	// Enqueueing after close starts nothing.
	p.enqueue(&blockingJob{started: make(chan struct{}), release: make(chan struct{})})
	p.wait()
}
