// Package ratelog bounds how much a caller can make the server log. Log
// lines about what a client sent (NACKs, refused names, rejected tokens)
// are driven by the client: without a bound, one local user looping on a
// bad request fills the disk. A Limiter lets a few lines per caller per
// interval through, truncates the client-supplied values in them, and
// reports on the next line it lets through how many were left out.
package ratelog

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// MaxValue is the most bytes of one client-supplied value that reach the log.
const MaxValue = 256

// Defaults: what one caller may log, and what all callers together may log,
// per Interval. A server with thousands of callers still writes at most
// GlobalBurst lines per Interval from this path.
const (
	Burst       = 5
	GlobalBurst = 100
	Interval    = 10 * time.Second
	maxKeys     = 10000
)

type window struct {
	start      time.Time
	n          int
	suppressed int
}

// Limiter rate-limits log lines per key (a caller) and in total. The zero
// value is not usable; call New.
type Limiter struct {
	log *slog.Logger

	mu     sync.Mutex
	now    func() time.Time
	keys   map[string]*window
	global window
	swept  time.Time
}

// New returns a Limiter that writes to log.
func New(log *slog.Logger) *Limiter {
	return &Limiter{log: log, now: time.Now, keys: map[string]*window{}}
}

// SetClock replaces the clock; tests use it to end an interval.
func (l *Limiter) SetClock(now func() time.Time) {
	l.mu.Lock()
	l.now = now
	l.mu.Unlock()
}

// allow reports whether a line for key may be written now and, if so, how
// many lines for key were suppressed before it.
func (l *Limiter) allow(key string) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	w := l.keys[key]
	if w == nil {
		if len(l.keys) >= maxKeys {
			l.sweep(now)
		}
		if len(l.keys) >= maxKeys {
			key = "" // too many callers at once: they share one window
			if w = l.keys[key]; w == nil {
				w = &window{start: now}
				l.keys[key] = w
			}
		} else {
			w = &window{start: now}
			l.keys[key] = w
		}
	}
	if now.Sub(w.start) >= Interval {
		w.start, w.n = now, 0
	}
	if now.Sub(l.global.start) >= Interval {
		l.global.start, l.global.n = now, 0
	}
	if w.n >= Burst || l.global.n >= GlobalBurst {
		w.suppressed++
		return false, 0
	}
	w.n++
	l.global.n++
	s := w.suppressed
	w.suppressed = 0
	return true, s
}

// sweep forgets callers whose window is over and who have nothing to report.
// At most once per Interval, so a flood of new callers costs no more than
// one pass over the map per Interval.
func (l *Limiter) sweep(now time.Time) {
	if now.Sub(l.swept) < Interval {
		return
	}
	l.swept = now
	for k, w := range l.keys {
		if now.Sub(w.start) >= Interval && w.suppressed == 0 {
			delete(l.keys, k)
		}
	}
}

// Log writes one line for key at level unless key (or everyone) is over its
// budget; the line then carries "suppressed", the count of lines for key
// left out since its previous line. Values in args should already be
// bounded (see Truncate).
func (l *Limiter) Log(ctx context.Context, level slog.Level, key, msg string, args ...any) {
	if !l.log.Enabled(ctx, level) {
		return
	}
	ok, suppressed := l.allow(key)
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	l.log.Log(ctx, level, msg, args...)
}

// Truncate bounds a client-supplied string to MaxValue bytes (cut on a rune
// boundary), saying how long it was.
func Truncate(s string) string {
	if len(s) <= MaxValue {
		return s
	}
	return cut(s) + "...(" + strconv.Itoa(len(s)) + " bytes)"
}

// cut returns at most MaxValue bytes of s, ending on a rune boundary.
func cut(s string) string {
	if len(s) <= MaxValue {
		return s
	}
	n := MaxValue
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// TruncateList bounds a client-supplied list as one string of about
// MaxValue bytes, saying how many items it had when some are left out.
func TruncateList(items []string) string {
	var b strings.Builder
	for i, it := range items {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(Truncate(it))
		if b.Len() >= MaxValue && i < len(items)-1 {
			return cut(b.String()) + "...(" + strconv.Itoa(len(items)) + " items)"
		}
	}
	return Truncate(b.String())
}
