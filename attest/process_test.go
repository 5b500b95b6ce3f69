package attest

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/peer"
)

// childEnv makes the test binary a peer: it connects to the unix socket
// named by the variable, says "connected", and exits when stdin closes.
const childEnv = "MESHID_ATTEST_CHILD"

func TestMain(m *testing.M) {
	if sock := os.Getenv(childEnv); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		fmt.Println("connected")
		io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	// Children, their pipes and the handshakes' goroutines must all be
	// gone by the end.
	goleak.VerifyTestMain(m)
}

const waitLong = 20 * time.Second

// peerChild is a real child process connected to a socket of ours, and
// our end of its connection after the server handshake.
type peerChild struct {
	cmd   *exec.Cmd
	exe   string // the executable it runs
	stdin io.WriteCloser
	conn  net.Conn
	pc    PeerCred
	creds unixCreds
}

// connectChild starts the test binary as a peer and runs UnixCredentials'
// server handshake on its connection.
func connectChild(t *testing.T) *peerChild {
	t.Helper()
	return connectChildAs(t, nil)
}

// connectChildAs is connectChild with the child run as cred (nil: as
// ourselves); the socket is then open to every user.
func connectChildAs(t *testing.T, cred *syscall.Credential) *peerChild {
	t.Helper()
	dir, err := os.MkdirTemp("", "meshid-attest-") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		if os.Geteuid() != 0 {
			t.Skip("needs root to run a child as another user")
		}
		// The build directory is private; another user runs a copy.
		b, err := os.ReadFile(exe)
		if err != nil {
			t.Fatal(err)
		}
		exe = filepath.Join(dir, "peer")
		if err := os.WriteFile(exe, b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(sock, 0o777); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+sock)
	if cred != nil {
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &peerChild{cmd: cmd, stdin: stdin, exe: exe}
	t.Cleanup(c.stop)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "connected\n" {
		t.Fatalf("child said %q: %v", line, err)
	}
	raw, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.creds = UnixCredentials().(unixCreds)
	conn, info, err := c.creds.ServerHandshake(raw)
	if err != nil {
		raw.Close()
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	c.conn, c.pc = conn, info.(PeerCred)
	if c.pc.PID != cmd.Process.Pid || c.pc.proc == nil {
		t.Fatalf("peer credentials %v (tracked: %v), want the child's pid %d tracked", c.pc, c.pc.proc != nil, cmd.Process.Pid)
	}
	return c
}

// stop ends the child and reaps it.
func (c *peerChild) stop() {
	c.stdin.Close()
	c.cmd.Wait()
}

// startSleeper starts a process that runs until the test ends.
func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/bin/sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// modes are the kernels the tracking must hold on.
var modes = []struct {
	name   string
	kernel int
	how    string
}{
	{"SO_PEERPIDFD", pidfdAll, "SO_PEERPIDFD"},
	{"pidfd_open", pidfdOpenOnly, "pidfd_open"},
	{"no pidfd", pidfdNone, "start time only"},
}

func withKernel(t *testing.T, kernel int) {
	old := pidfdKernel
	pidfdKernel = kernel
	t.Cleanup(func() { pidfdKernel = old })
}

// The pid of the process that connected now names another process (one
// that started later: pid reuse). A pid cannot be made to be reused on
// demand, so the procfs the check reads is pointed at a directory in which
// the caller's pid is the other, real process's /proc entry: the check
// must notice the different start time and refuse.
func TestCheckRefusesAnotherProcessUnderTheCallersPid(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withKernel(t, m.kernel)
			c := connectChild(t)
			p := c.pc.proc
			if p.how != m.how {
				t.Fatalf("tracked with %s, want %s", p.how, m.how)
			}
			if err := p.Check(); err != nil {
				t.Fatalf("live caller: %v", err)
			}
			// Another process whose start time differs from the child's:
			// start-time ticks are coarse, so start again until it does.
			var other *exec.Cmd
			deadline := time.Now().Add(waitLong)
			for {
				other = startSleeper(t)
				s, _, err := readStat("/proc", other.Process.Pid)
				if err != nil {
					t.Fatal(err)
				}
				if s != p.start {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no process with another start time")
				}
			}
			fake := t.TempDir()
			if err := os.Symlink(filepath.Join("/proc", strconv.Itoa(other.Process.Pid)), filepath.Join(fake, strconv.Itoa(p.pid))); err != nil {
				t.Fatal(err)
			}
			p.root = fake // safe: nothing else uses p yet
			err := p.Check()
			if !errors.Is(err, ErrProcessGone) || !strings.Contains(err.Error(), "start time") {
				t.Fatalf("check with pid %d now naming another process: %v, want ErrProcessGone for its start time", p.pid, err)
			}
			// And the same through the attestation path: no selectors of the
			// other process are handed out under the caller's credentials.
			ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: c.pc})
			if got, err := CallerFromContext(ctx); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("attesting the reused pid: %v, %v; want ErrProcessGone", got.Selectors, err)
			}
		})
	}
}

// A caller that exits is refused from then on: as a zombie (not yet
// reaped, pid still taken) and once reaped.
func TestCheckRefusesAnExitedCaller(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withKernel(t, m.kernel)
			c := connectChild(t)
			p := c.pc.proc
			if err := p.Check(); err != nil {
				t.Fatalf("live caller: %v", err)
			}
			c.stdin.Close()
			// Not reaped yet: poll until it has exited.
			deadline := time.Now().Add(waitLong)
			for p.Check() == nil {
				if time.Now().After(deadline) {
					t.Fatal("exited caller still passes the check")
				}
				time.Sleep(5 * time.Millisecond) // polling a condition, not synchronising
			}
			if err := p.Check(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("zombie: %v, want ErrProcessGone", err)
			}
			c.cmd.Wait()
			if err := p.Check(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("reaped: %v, want ErrProcessGone", err)
			}
			ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: c.pc})
			if got, err := CallerFromContext(ctx); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("attesting an exited caller: %v, %v; want ErrProcessGone", got.Selectors, err)
			}
			// Closing the connection releases the pidfd; the check fails.
			c.conn.Close()
			if err := p.Check(); !errors.Is(err, ErrProcessGone) {
				t.Fatalf("after close: %v, want ErrProcessGone", err)
			}
		})
	}
}

// A connection whose process has already exited when the server accepts
// it is refused: there is no process to attest.
func TestHandshakeRefusesAnExitedPeer(t *testing.T) {
	dir, err := os.MkdirTemp("", "meshid-attest-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+sock)
	cmd.Stdin = strings.NewReader("") // exits at once after connecting
	cmd.Stdout = io.Discard
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	raw, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, info, err := UnixCredentials().ServerHandshake(raw); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("handshake with an exited peer: %v, %v; want ErrProcessGone", info, err)
	}
}

// The attested selectors of a live caller: uid and gid, its pid, and its
// executable's path and SHA-256.
func TestCallerSelectors(t *testing.T) {
	c := connectChild(t)
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: c.pc})
	got, err := CallerFromContext(ctx)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	want := []string{
		"unix:uid:" + strconv.Itoa(os.Getuid()),
		"unix:gid:" + strconv.Itoa(os.Getgid()),
		"unix:pid:" + strconv.Itoa(c.cmd.Process.Pid),
		"unix:path:" + exe,
		"unix:sha256:" + hex.EncodeToString(sum[:]),
	}
	if !slices.Equal(got.Selectors, want) {
		t.Fatalf("selectors %q, want %q", got.Selectors, want)
	}
	if got.Check == nil || got.Check() != nil {
		t.Fatal("a live local caller has a passing Check")
	}
}

// readStat finds the fields after the command name even when the name
// holds spaces and parentheses (any process can name itself so).
func TestReadStatOddCommandName(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "7"), 0o755); err != nil {
		t.Fatal(err)
	}
	fields := []string{"7", "(a) S 1 (b)", "R"}
	for i := 4; i <= 52; i++ {
		fields = append(fields, strconv.Itoa(i*1000))
	}
	if err := os.WriteFile(filepath.Join(root, "7", "stat"), []byte(strings.Join(fields, " ")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	start, state, err := readStat(root, 7)
	if err != nil || start != 22000 || state != 'R' {
		t.Fatalf("readStat = %d %c %v, want 22000 R", start, state, err)
	}
}

// The digest cache hashes each file version once, and must not serve an
// old digest for a file rewritten in place with its mtime set back (which
// its owner can do): the ctime changes anyway.
func TestExeHashCacheSeesRewriteWithOldMtime(t *testing.T) {
	h := newExeHasher()
	f := filepath.Join(t.TempDir(), "exe")
	if err := os.WriteFile(f, []byte("version one"), 0o755); err != nil {
		t.Fatal(err)
	}
	var before unix.Stat_t
	if err := unix.Stat(f, &before); err != nil {
		t.Fatal(err)
	}
	first, err := h.sum(f)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := h.sum(f); err != nil || again != first || h.hashes != 1 {
		t.Fatalf("unchanged file: %s %v after %d digests, want %s from the cache", again, err, h.hashes, first)
	}
	// Same size, same mtime; the ctime moves on by at least the
	// filesystem's timestamp granularity, so rewrite until it has.
	mtime := time.Unix(before.Mtim.Unix())
	deadline := time.Now().Add(waitLong)
	for {
		if err := os.WriteFile(f, []byte("version two"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		var now unix.Stat_t
		if err := unix.Stat(f, &now); err != nil {
			t.Fatal(err)
		}
		if now.Mtim != before.Mtim || now.Size != before.Size {
			t.Fatalf("mtime or size not restored: %v %d", now.Mtim, now.Size)
		}
		if now.Ctim != before.Ctim {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ctime never changed")
		}
		time.Sleep(time.Millisecond) // waiting out timestamp granularity, a polled condition
	}
	second, err := h.sum(f)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256([]byte("version two"))
	if second != hex.EncodeToString(want[:]) {
		t.Fatalf("after rewrite: %s, want %x (before: %s)", second, want, first)
	}
}

// An executable over the bound gets no digest, so no unix:sha256 entry
// matches it, rather than a long read.
func TestExeHashBounded(t *testing.T) {
	f := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(f, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(f, MaxExeHashSize+1); err != nil { // sparse: no disk used
		t.Fatal(err)
	}
	if sum, err := newExeHasher().sum(f); err == nil {
		t.Fatalf("digest %s of a file over the bound", sum)
	}
}

// Without SO_PEERPIDFD the pid may have been reused between connect and
// accept; a process of another user under the caller's pid is refused at
// accept. Simulated as above: the procfs read names, under the caller's
// pid, a real process of uid 65534.
func TestTrackRefusesAnotherUsersProcessAtAccept(t *testing.T) {
	other := exec.Command("/bin/sleep", "1000")
	other.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill(); other.Wait() })
	const callerPid = 4242 // any number: it names the other process here
	fake := t.TempDir()
	if err := os.Symlink(filepath.Join("/proc", strconv.Itoa(other.Process.Pid)), filepath.Join(fake, strconv.Itoa(callerPid))); err != nil {
		t.Fatal(err)
	}
	if p, err := trackProcess(fake, callerPid, 0, -1, false, nil); !errors.Is(err, ErrProcessGone) || !strings.Contains(err.Error(), "uid 65534") {
		t.Fatalf("tracking a uid-0 caller whose pid names a uid-65534 process: %v, %v; want ErrProcessGone naming uid 65534", p, err)
	}
	// The same process under its own uid is tracked.
	p, err := trackProcess(fake, callerPid, 65534, -1, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
}
