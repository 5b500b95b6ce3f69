package fakeclock

import (
	"slices"
	"testing"
	"time"
)

// TestAdvanceFiresDueTimersInOrder: timers fire in due order with the clock
// at their due time, timers armed by a firing timer fire in the same
// Advance if due, and a stopped timer never fires.
func TestAdvanceFiresDueTimersInOrder(t *testing.T) {
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c := New(start)
	var got []time.Duration
	record := func() { got = append(got, c.Now().Sub(start)) }
	c.AfterFunc(3*time.Hour, record)
	c.AfterFunc(time.Hour, func() {
		record()
		c.AfterFunc(30*time.Minute, record) // due at 1h30, inside this Advance
	})
	stop := c.AfterFunc(2*time.Hour, record)
	if !stop() || stop() {
		t.Fatal("stop must report true once, then false")
	}
	c.AfterFunc(5*time.Hour, record)
	c.Advance(4 * time.Hour)
	want := []time.Duration{time.Hour, 90 * time.Minute, 3 * time.Hour}
	if !slices.Equal(got, want) {
		t.Fatalf("fired at %v, want %v", got, want)
	}
	if c.Now() != start.Add(4*time.Hour) {
		t.Fatalf("clock at %v after Advance(4h)", c.Now().Sub(start))
	}
}
