//go:build unix

package ca

import (
	"syscall"
	"testing"
	"time"
)

// cpuPerOp starts counting the process's CPU time (user+system); the
// returned func reports it per operation as "cpu-ns/op". On a shared machine
// that figure depends much less on other load than ns/op does, since time
// spent waiting for a core is not in it.
func cpuPerOp(b *testing.B) func() {
	start := processCPU()
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64((processCPU()-start).Nanoseconds())/float64(b.N), "cpu-ns/op")
		}
	}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
