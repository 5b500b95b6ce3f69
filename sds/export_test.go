package sds

import (
	"time"

	dto "github.com/prometheus/client_model/go"
)

// SetClientLogClock replaces the clock of the server's client-log rate
// limit, so a test can end an interval without waiting for it.
func SetClientLogClock(s *Server, now func() time.Time) { s.clientLog.SetClock(now) }

// NACKCounter is the server's NACK counter, which a test polls to know the
// server has read every request it sent.
func NACKCount(s *Server) float64 {
	var m dto.Metric
	if err := s.metrics.NACKs.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// Pushers is the size of the server's pool of pusher goroutines: a test
// that means to stall them all needs more streams than that.
func Pushers() int { return pushers() }
