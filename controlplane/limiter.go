package controlplane

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"golang.org/x/time/rate"
)

// ErrSignBusy is returned when signing would wait longer than the queue
// allows; the admin API maps it to ResourceExhausted so clients back off.
var ErrSignBusy = errors.New("signing is at its rate limit; retry later")

// signLimiter bounds signing: at most `concurrency` at once and, if rate
// > 0, `rate` per second on average with a burst of one second's worth. A
// request that would wait longer than maxWait is refused at once instead
// of queueing without end, so a mass re-issue (every SVID after a CA
// activation) becomes a spread over time rather than an outage.
//
// The rate is a token bucket from golang.org/x/time/rate; concurrency is a
// buffered channel used as a semaphore (golang.org/x/sync is not a
// dependency, and a channel also selects against a timer and ctx).
type signLimiter struct {
	sem     chan struct{} // nil: no concurrency cap
	lim     *rate.Limiter // nil: no rate cap
	maxWait time.Duration // queue bound when acquire is given none
}

func newSignLimiter(concurrency int, perSecond float64, maxWait time.Duration) *signLimiter {
	l := &signLimiter{maxWait: maxWait}
	if concurrency > 0 {
		l.sem = make(chan struct{}, concurrency)
	}
	if perSecond > 0 {
		// A second's worth of tokens plus the one due now: the bucket the
		// limiter had before it was built on x/time/rate, so an idle server
		// still signs rate+1 at once.
		l.lim = rate.NewLimiter(rate.Limit(perSecond), int(math.Floor(perSecond))+1)
	}
	return l
}

// acquire waits for a token and a concurrency slot and returns how long it
// waited and a release func. maxWait <= 0 means the limiter's default.
func (l *signLimiter) acquire(ctx context.Context, maxWait time.Duration) (time.Duration, func(), error) {
	if maxWait <= 0 {
		maxWait = l.maxWait
	}
	start := time.Now()
	if l.lim != nil {
		at, r, err := l.reserve(start, maxWait)
		if err != nil {
			return 0, nil, err
		}
		if wait := at.Sub(start); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				// The caller has gone: give the token back, or every
				// abandoned renewal would push later ones further out.
				r.Cancel()
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
// used, or refuses, taking nothing, if that is more than maxWait after now.
func (l *signLimiter) reserve(now time.Time, maxWait time.Duration) (time.Time, *rate.Reservation, error) {
	r := l.lim.ReserveN(now, 1)
	if !r.OK() {
		// Only if the burst were below one, which newSignLimiter never makes.
		return time.Time{}, nil, fmt.Errorf("%w (limit %g/s admits no request)", ErrSignBusy, float64(l.lim.Limit()))
	}
	wait := r.DelayFrom(now)
	if wait > maxWait {
		r.CancelAt(now)
		return time.Time{}, nil, fmt.Errorf("%w (queue would be %s, limit %g/s)", ErrSignBusy, wait.Truncate(time.Millisecond), float64(l.lim.Limit()))
	}
	return now.Add(wait), r, nil
}
