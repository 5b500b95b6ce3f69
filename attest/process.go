package attest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrProcessGone means the process that connected has exited, or its pid
// now names another process. Whatever was attested about it no longer
// holds; APIs answer it with PermissionDenied and end the stream.
var ErrProcessGone = errors.New("caller process has exited or its pid now names another process")

// Process is the peer process of one unix connection, tracked from accept
// (as SPIRE's peertracker does) so that what is read about it by pid later
// (its executable, whether it still runs) is known to be about the process
// that connected, not about one that was given the same pid after it
// exited: pid_max is often 32768, and another user can wait for a pid.
//
// It holds the start time from /proc/<pid>/stat, which differs between
// two processes that had the same pid, and where the kernel has them a
// pidfd: SO_PEERPIDFD (Linux 6.5) names the very process that called
// connect, so the pid reused between connect and accept is caught too;
// pidfd_open (5.3) names whoever holds the pid at accept.
type Process struct {
	pid   int
	start uint64
	root  string // the procfs mount; tests point it elsewhere
	exe   *exeHasher

	how string // "SO_PEERPIDFD", "pidfd_open" or "start time only", for tests and logs

	mu     sync.RWMutex
	pidfd  int // -1 if none
	closed bool
}

// trackProcess starts tracking pid. pidfd (owned by the Process from here
// on, -1 if none) is from SO_PEERPIDFD if peerFD, else from pidfd_open or
// none. uid is the peer's uid from SO_PEERCRED.
func trackProcess(root string, pid, uid, pidfd int, peerFD bool, h *exeHasher) (*Process, error) {
	p := &Process{pid: pid, root: root, exe: h, pidfd: pidfd, how: "start time only"}
	switch {
	case pidfd >= 0 && peerFD:
		p.how = "SO_PEERPIDFD"
	case pidfd >= 0:
		p.how = "pidfd_open"
	}
	fail := func(err error) (*Process, error) {
		p.Close()
		return nil, err
	}
	if pid <= 0 {
		// The peer is in a pid namespace we cannot see into.
		return fail(fmt.Errorf("peer pid %d is not visible from this pid namespace", pid))
	}
	if pidfd >= 0 {
		got, err := pidfdPid(pidfd)
		switch {
		case err != nil:
			return fail(fmt.Errorf("pidfd of pid %d: %w", pid, err))
		case got == -1:
			return fail(fmt.Errorf("pid %d: %w", pid, ErrProcessGone))
		case got != pid:
			// Our procfs and the socket disagree about which process this
			// is (another pid namespace): nothing read by pid would be
			// about the caller.
			return fail(fmt.Errorf("peer pid %d is pid %d in this procfs", pid, got))
		}
	}
	start, state, err := readStat(root, pid)
	if err != nil {
		return fail(fmt.Errorf("pid %d: %w: %v", pid, ErrProcessGone, err))
	}
	p.start = start
	if !peerFD {
		// Without SO_PEERPIDFD the pid may already have been reused
		// between connect and now. A process of another user taking it is
		// the attack that matters; SPIRE checks the owner the same way.
		euid, err := readEUID(root, pid)
		if err != nil {
			return fail(fmt.Errorf("pid %d: %w: %v", pid, ErrProcessGone, err))
		}
		if euid != uid {
			return fail(fmt.Errorf("pid %d: %w: it runs as uid %d, the peer connected as uid %d", pid, ErrProcessGone, euid, uid))
		}
	}
	if err := p.alive(state); err != nil {
		return fail(err)
	}
	return p, nil
}

// PID is the process's pid.
func (p *Process) PID() int { return p.pid }

// Check reports whether the process that connected is still running
// under its pid: nil if so, an error wrapping ErrProcessGone if it has
// exited (a zombie counts) or its pid names another process.
func (p *Process) Check() error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return fmt.Errorf("pid %d: %w: connection closed", p.pid, ErrProcessGone)
	}
	// Read the stat first and ask the pidfd second: a pid is not given to
	// another process before its holder is reaped, so if the pidfd says
	// the process still runs, the stat read before was its own.
	start, state, err := readStat(p.root, p.pid)
	if err != nil {
		return fmt.Errorf("pid %d: %w: %v", p.pid, ErrProcessGone, err)
	}
	if start != p.start {
		return fmt.Errorf("pid %d: %w: its start time is %d, the caller's was %d", p.pid, ErrProcessGone, start, p.start)
	}
	return p.alive(state)
}

// alive checks, after a read of the stat that gave state, that the
// process has not exited. p.mu is held, or p is not shared yet.
func (p *Process) alive(state byte) error {
	if state == 'Z' || state == 'X' {
		return fmt.Errorf("pid %d: %w: it has exited", p.pid, ErrProcessGone)
	}
	if p.pidfd >= 0 {
		// A pidfd becomes readable when its process exits.
		fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return fmt.Errorf("pid %d: poll pidfd: %w", p.pid, err)
			}
			if n > 0 {
				return fmt.Errorf("pid %d: %w: it has exited", p.pid, ErrProcessGone)
			}
			break
		}
	}
	return nil
}

// Close releases the pidfd; Check fails from then on.
func (p *Process) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
		p.pidfd = -1
	}
}

// exeSelectors returns the unix:path and unix:sha256 selectors of the
// process's executable, those it can read: a process of another user is
// unreadable to a server that is not root, and a deleted executable has
// no path. The caller must Check afterwards: until then they may describe
// a process that took the pid.
func (p *Process) exeSelectors() []string {
	var out []string
	exe := filepath.Join(p.root, strconv.Itoa(p.pid), "exe")
	if path, err := os.Readlink(exe); err == nil && filepath.IsAbs(path) && !strings.HasSuffix(path, " (deleted)") {
		// A deleted executable (replaced on upgrade, say) is no longer
		// what its path names; matching it by path would be wrong.
		out = append(out, "unix:path:"+path)
	}
	if p.exe != nil {
		if sum, err := p.exe.sum(exe); err == nil {
			out = append(out, "unix:sha256:"+sum)
		}
	}
	return out
}

// readStat returns the start time (field 22, in clock ticks since boot)
// and the state (field 3) from root/<pid>/stat.
func readStat(root string, pid int) (uint64, byte, error) {
	var buf [1024]byte // a stat line is a few hundred bytes
	b, err := readProcFile(filepath.Join(root, strconv.Itoa(pid), "stat"), buf[:])
	if err != nil {
		return 0, 0, err
	}
	// Field 2, the command name, is in parentheses and may itself hold
	// spaces and parentheses: the fields that follow start after the last
	// ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("malformed stat of pid %d", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("malformed stat of pid %d", pid)
	}
	start, err := strconv.ParseUint(f[19], 10, 64) // field 22: f[0] is field 3
	if err != nil {
		return 0, 0, fmt.Errorf("malformed start time in stat of pid %d: %w", pid, err)
	}
	return start, f[0][0], nil
}

// readEUID returns the effective uid from root/<pid>/status (the owner of
// /proc/<pid> would be root for a non-dumpable process).
func readEUID(root string, pid int) (int, error) {
	var buf [4096]byte
	b, err := readProcFile(filepath.Join(root, strconv.Itoa(pid), "status"), buf[:])
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(rest)
			if len(f) < 2 {
				break
			}
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("no Uid line in status of pid %d", pid)
}

// readProcFile reads a small procfs file into buf with plain system calls:
// this runs for every connection and request, and os.File's set-up (a
// poller registration that fails for such files) would double the cost.
// Procfs hands out a whole file in one read if buf holds it.
func readProcFile(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	n := 0
	for n < len(buf) {
		m, err := unix.Read(fd, buf[n:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
	return nil, fmt.Errorf("%s: over %d bytes", path, len(buf))
}

// pidfdPid returns the pid a pidfd names here: -1 once the process has
// been reaped, 0 if it is outside our pid namespace. PIDFD_GET_INFO
// (Linux 6.13) answers in one call; older kernels have /proc/self/fdinfo.
func pidfdPid(pidfd int) (int, error) {
	info := unix.PidfdInfo{Mask: unix.PIDFD_INFO_PID}
	err := unix.IoctlPidfdInfo(pidfd, &info)
	switch {
	case err == nil:
		return int(info.Pid), nil
	case errors.Is(err, unix.ESRCH):
		return -1, nil
	default:
		return fdinfoPid(pidfd)
	}
}

// fdinfoPid returns the pid a pidfd names in our procfs (from
// /proc/self/fdinfo): -1 once the process has been reaped, 0 if it is
// outside our pid namespace.
func fdinfoPid(pidfd int) (int, error) {
	var buf [1024]byte
	b, err := readProcFile("/proc/self/fdinfo/"+strconv.Itoa(pidfd), buf[:])
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Pid:"); ok {
			return strconv.Atoi(strings.TrimSpace(rest))
		}
	}
	return 0, errors.New("fdinfo has no Pid line (not a pidfd?)")
}

// openPidfd returns a pidfd for the peer of the unix socket fd: from
// SO_PEERPIDFD where the kernel has it (peer reports true), else from
// pidfd_open of pid; -1 on kernels with neither.
func openPidfd(fd, pid int) (pidfd int, peer bool, err error) {
	if pidfdKernel == pidfdNone {
		return -1, false, nil
	}
	if pidfdKernel == pidfdAll {
		pidfd, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		if err == nil {
			return pidfd, true, nil
		}
		if errors.Is(err, unix.ESRCH) || errors.Is(err, unix.EINVAL) {
			// No peer process, or no longer one with a thread group.
			return -1, false, fmt.Errorf("pid %d: %w: SO_PEERPIDFD: %v", pid, ErrProcessGone, err)
		}
		// ENOPROTOOPT before Linux 6.5; anything else (a seccomp filter,
		// say) is no reason to refuse the caller: fall back.
	}
	pidfd, err = unix.PidfdOpen(pid, 0)
	switch {
	case err == nil:
		return pidfd, false, nil
	case errors.Is(err, unix.ESRCH):
		return -1, false, fmt.Errorf("pid %d: %w", pid, ErrProcessGone)
	default:
		// ENOSYS before Linux 5.3, EPERM under older container seccomp
		// profiles: the start time alone is checked.
		return -1, false, nil
	}
}

// pidfdKernel is which pidfd calls openPidfd uses: all the kernel has,
// unless tests make it take the path of an older kernel. Set only by
// tests, before any connection.
var pidfdKernel = pidfdAll

const (
	pidfdAll      = iota
	pidfdOpenOnly // as before Linux 6.5: no SO_PEERPIDFD
	pidfdNone     // as before Linux 5.3: no pidfds
)
