package ratelog

import (
	"bytes"
	"context"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestLimiterPerKeyAndSuppressedCount(t *testing.T) {
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, nil)))
	now := time.Unix(1000, 0)
	l.SetClock(func() time.Time { return now })
	for range 50 {
		l.Log(context.Background(), slog.LevelWarn, "a", "m")
	}
	l.Log(context.Background(), slog.LevelWarn, "b", "m")
	if got := strings.Count(buf.String(), "\n"); got != Burst+1 {
		t.Fatalf("%d lines, want %d (burst for a, one for b)", got, Burst+1)
	}
	now = now.Add(Interval)
	buf.Reset()
	l.Log(context.Background(), slog.LevelWarn, "a", "m")
	if want := "suppressed=" + itoa(50-Burst); !strings.Contains(buf.String(), want) {
		t.Fatalf("after the interval got %q, want it to carry %s", buf.String(), want)
	}
}

func TestLimiterGlobalBudgetAndKeyBound(t *testing.T) {
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, nil)))
	now := time.Unix(1000, 0)
	l.SetClock(func() time.Time { return now })
	for i := range maxKeys + 500 {
		l.Log(context.Background(), slog.LevelWarn, itoa(i), "m")
	}
	if got := strings.Count(buf.String(), "\n"); got != GlobalBurst {
		t.Fatalf("%d lines from many callers, want the global budget %d", got, GlobalBurst)
	}
	if len(l.keys) > maxKeys+1 { // +1: the window callers share when the map is full
		t.Fatalf("%d keys tracked, want at most %d", len(l.keys), maxKeys+1)
	}
}

func TestTruncate(t *testing.T) {
	long := strings.Repeat("é", 1000) // 2 bytes each: a cut could split one
	got := Truncate(long)
	if len(got) > MaxValue+32 || !utf8.ValidString(got) || !strings.Contains(got, "(2000 bytes)") {
		t.Fatalf("Truncate gave %d bytes %q", len(got), got)
	}
	if Truncate("short") != "short" {
		t.Fatal("short value changed")
	}
	list := TruncateList([]string{strings.Repeat("x", 100000), "a", "b"})
	if len(list) > MaxValue+32 || !strings.Contains(list, "(3 items)") {
		t.Fatalf("TruncateList gave %d bytes %q", len(list), list)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
