package workload

import "time"

// SetClientLogClock replaces the clock of the server's client-log rate
// limit, so a test can end an interval without waiting for it.
func SetClientLogClock(s *Server, now func() time.Time) { s.clientLog.SetClock(now) }
