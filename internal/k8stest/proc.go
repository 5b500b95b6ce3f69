package k8stest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Process is one child of the bed as state.json records it. StartTime is
// field 22 of /proc/PID/stat (clock ticks since boot): together with the pid
// it names one process for the life of the machine, so a pid the kernel has
// since handed to something else is never signalled.
type Process struct {
	Name      string `json:"name"`
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
	Exe       string `json:"exe"`
	Log       string `json:"log"`
}

// procStat returns the start time and state letter of pid from
// /proc/PID/stat.
func procStat(pid int) (start uint64, state byte, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// comm (field 2) may hold spaces and parentheses; the fields after the
	// last ')' are fixed.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no comm", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), so field 22 (starttime) is f[19].
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat starttime: %w", pid, err)
	}
	return start, f[0][0], nil
}

// StartTime returns the kernel's start time of pid (field 22 of
// /proc/PID/stat), the value Process.StartTime records.
func StartTime(pid int) (uint64, error) {
	st, _, err := procStat(pid)
	return st, err
}

// alive reports whether p still names the process the bed started: same
// pid, same start time, and not a zombie waiting to be reaped.
func (p Process) alive() bool {
	st, state, err := procStat(p.PID)
	if err != nil {
		return false
	}
	return st == p.StartTime && state != 'Z'
}

// stop sends SIGTERM to p, waits up to grace for it to go, then SIGKILLs it
// and waits again. A pid that now names another process is left alone.
// reaped, when not nil, is closed once the caller's own Wait has collected
// the child; without it (the bed was started by another process) the pid is
// polled in /proc, where a zombie counts as gone.
func (p Process) stop(ctx context.Context, grace time.Duration, reaped <-chan struct{}) error {
	if p.PID <= 0 || !p.alive() {
		return nil
	}
	if err := syscall.Kill(p.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("SIGTERM %s (pid %d): %w", p.Name, p.PID, err)
	}
	if p.waitGone(ctx, grace, reaped) {
		return nil
	}
	// Check once more right before the kill: the window between the check
	// and the signal is the same one every pid-based tool has, but it is
	// microseconds, not the whole grace period.
	if p.alive() {
		if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("SIGKILL %s (pid %d): %w", p.Name, p.PID, err)
		}
	}
	if p.waitGone(ctx, 10*time.Second, reaped) {
		return nil
	}
	return fmt.Errorf("%s (pid %d) still running after SIGKILL", p.Name, p.PID)
}

func (p Process) waitGone(ctx context.Context, d time.Duration, reaped <-chan struct{}) bool {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if reaped == nil && !p.alive() {
			return true
		}
		select {
		case <-reaped:
			return true
		case <-tick.C:
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}
