package controlplane

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrSignBusy is returned when signing would wait longer than the queue
// allows; the admin API maps it to ResourceExhausted so clients back off.
var ErrSignBusy = errors.New("signing is at its rate limit; retry later")

// signLimiter bounds signing: at most `concurrency` at once and, if rate
// > 0, `rate` per second on average with a burst of one second's worth. A
// request that would wait longer than maxWait is refused at once instead
// of queueing without end, so a mass re-issue (every SVID after a CA
// activation) becomes a spread over time rather than an outage.
type signLimiter struct {
	sem     chan struct{}
	rate    float64
	burst   time.Duration
	maxWait time.Duration

	mu       sync.Mutex
	nextFree time.Time // when the next token is available
}

func newSignLimiter(concurrency int, rate float64, maxWait time.Duration) *signLimiter {
	l := &signLimiter{rate: rate, maxWait: maxWait, burst: time.Second}
	if concurrency > 0 {
		l.sem = make(chan struct{}, concurrency)
	}
	return l
}

// acquire waits for a token and a concurrency slot and returns how long it
// waited and a release func.
func (l *signLimiter) acquire(ctx context.Context, maxWait time.Duration) (time.Duration, func(), error) {
	start := time.Now()
	if l.rate > 0 {
		now := time.Now()
		at, err := l.reserve(now, maxWait)
		if err != nil {
			return 0, nil, err
		}
		if wait := at.Sub(now); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return 0, nil, ctx.Err()
			}
		}
	}
	if l.sem == nil {
		return time.Since(start), func() {}, nil
	}
	remaining := maxWait - time.Since(start)
	t := time.NewTimer(max(remaining, 0))
	defer t.Stop()
	select {
	case l.sem <- struct{}{}:
		return time.Since(start), func() { <-l.sem }, nil
	case <-t.C:
		return 0, nil, fmt.Errorf("%w (all %d signing slots busy)", ErrSignBusy, cap(l.sem))
	case <-ctx.Done():
		return 0, nil, ctx.Err()
	}
}

// reserve takes the next token of the rate limit and says when it may be
// used, or refuses if that is more than maxWait after now.
func (l *signLimiter) reserve(now time.Time, maxWait time.Duration) (time.Time, error) {
	interval := time.Duration(float64(time.Second) / l.rate)
	l.mu.Lock()
	defer l.mu.Unlock()
	// Up to a second's worth of tokens may accumulate while idle.
	if floor := now.Add(-l.burst); l.nextFree.Before(floor) {
		l.nextFree = floor
	}
	at := l.nextFree
	if wait := at.Sub(now); wait > maxWait {
		return time.Time{}, fmt.Errorf("%w (queue would be %s, limit %.0f/s)", ErrSignBusy, wait.Truncate(time.Millisecond), l.rate)
	}
	l.nextFree = at.Add(interval)
	return at, nil
}
