package pcrsigner

import (
	"sync"
	"time"
)

// fairQueue is a bounded work queue that serves nodes in turn: a kubelet
// restart puts every pod certificate of its node in at once, and round
// robin over nodes keeps that storm from delaying the other nodes' pods
// behind it. Like client-go's workqueue, a key is never handed to two
// workers at once: one added while it is being processed is queued again
// when Done is called.
type fairQueue struct {
	mu   sync.Mutex
	cond *sync.Cond
	max  int

	byNode     map[string][]string // pending keys per node, oldest first
	ring       []string            // nodes with pending keys, in serving order
	next       int                 // index into ring of the node served next
	queued     map[string]bool
	processing map[string]bool
	dirty      map[string]string // key -> node, added while processing
	n          int
	timers     map[*time.Timer]bool
	shutdown   bool
}

func newFairQueue(max int) *fairQueue {
	q := &fairQueue{max: max, byNode: map[string][]string{}, queued: map[string]bool{},
		processing: map[string]bool{}, dirty: map[string]string{}, timers: map[*time.Timer]bool{}}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add queues key for node; false when the queue is full (the key is then
// dropped: the informer's resync offers it again).
func (q *fairQueue) Add(key, node string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.addLocked(key, node)
}

func (q *fairQueue) addLocked(key, node string) bool {
	if q.shutdown || q.queued[key] {
		return true
	}
	if q.processing[key] {
		q.dirty[key] = node
		return true
	}
	if q.n >= q.max {
		return false
	}
	if len(q.byNode[node]) == 0 {
		q.ring = append(q.ring, node)
	}
	q.byNode[node] = append(q.byNode[node], key)
	q.queued[key] = true
	q.n++
	q.cond.Signal()
	return true
}

// AddAfter queues key for node after d (a retry with backoff).
func (q *fairQueue) AddAfter(key, node string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		delete(q.timers, t)
		q.addLocked(key, node)
	})
	q.timers[t] = true
}

// Get blocks until a key is pending, serving nodes in turn; false once
// the queue is shut down.
func (q *fairQueue) Get() (string, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.n == 0 && !q.shutdown {
		q.cond.Wait()
	}
	if q.shutdown {
		return "", false
	}
	if q.next >= len(q.ring) {
		q.next = 0
	}
	node := q.ring[q.next]
	keys := q.byNode[node]
	key := keys[0]
	if len(keys) == 1 {
		delete(q.byNode, node)
		q.ring = append(q.ring[:q.next], q.ring[q.next+1:]...)
	} else {
		q.byNode[node] = keys[1:]
		q.next++
	}
	delete(q.queued, key)
	q.processing[key] = true
	q.n--
	return key, true
}

// Done ends the processing of key.
func (q *fairQueue) Done(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, key)
	if node, ok := q.dirty[key]; ok {
		delete(q.dirty, key)
		q.addLocked(key, node)
	}
}

// Len is the number of pending keys.
func (q *fairQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// ShutDown wakes every Get and stops pending retries.
func (q *fairQueue) ShutDown() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.shutdown = true
	for t := range q.timers {
		t.Stop()
	}
	clear(q.timers)
	q.cond.Broadcast()
}
