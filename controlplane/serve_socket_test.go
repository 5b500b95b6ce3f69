package controlplane

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/store"
)

// Child modes of this test binary, run as another uid (the attacker or an
// unprivileged workload): selected by cpChildEnv, argument in cpArgEnv.
const (
	cpChildEnv = "MESHID_CP_CHILD"
	cpArgEnv   = "MESHID_CP_ARG"
	cpArg2Env  = "MESHID_CP_ARG2"
	nobody     = 65534
)

func init() {
	mode := os.Getenv(cpChildEnv)
	if mode == "" {
		return
	}
	arg, arg2 := os.Getenv(cpArgEnv), os.Getenv(cpArg2Env)
	var err error
	switch mode {
	case "mkdir": // an attacker pre-creating a socket directory
		if err = os.Mkdir(arg, 0o777); err == nil {
			err = os.Chmod(arg, 0o777)
		}
	case "symlink": // an attacker planting a symlink on a socket path
		err = os.Symlink(arg2, arg)
	case "fetch": // a workload asking for its own X.509-SVID
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		s, ferr := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+arg))
		if err = ferr; err == nil {
			fmt.Println(s.ID.String())
		}
	case "flood": // a local user holding as many connections as it can
		n, _ := strconv.Atoi(arg2)
		var conns []net.Conn
		for range n {
			c, derr := net.Dial("unix", arg)
			if derr != nil {
				break
			}
			conns = append(conns, c)
		}
		fmt.Printf("dialed %d\n", len(conns))
		_, _ = io.Copy(io.Discard, os.Stdin) // hold them until stdin closes
		for _, c := range conns {
			c.Close()
		}
	default:
		err = fmt.Errorf("unknown child mode %q", mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// binaryFor copies this test binary to a place uid 65534 can execute (the
// go build directory is root's, mode 0700).
func binaryFor(t *testing.T) string {
	t.Helper()
	dir := shortTemp(t)
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst := filepath.Join(dir, "cp.test")
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, src); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}

// asNobody returns a command running this test binary's child mode as uid
// and gid 65534.
func asNobody(t *testing.T, bin, mode string, args ...string) *exec.Cmd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a child as another uid")
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), cpChildEnv+"="+mode)
	if len(args) > 0 {
		cmd.Env = append(cmd.Env, cpArgEnv+"="+args[0])
	}
	if len(args) > 1 {
		cmd.Env = append(cmd.Env, cpArg2Env+"="+args[1])
	}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	return cmd
}

// shortTemp is a temp dir with a short path (unix socket paths are at most
// 107 bytes), mode 0755 so other users can reach what is below it unless
// a test changes that.
func shortTemp(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "msk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// stickyTemp is a /tmp-like directory: world-writable with the sticky bit.
func stickyTemp(t *testing.T) string {
	t.Helper()
	d := shortTemp(t)
	if err := os.Chmod(d, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestListenUnixRefusesUntrustedDirectories(t *testing.T) {
	bin := binaryFor(t)
	victim := filepath.Join(shortTemp(t), "victim")
	if err := os.WriteFile(victim, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, base string) (socket, badDir string)
	}{
		{"directory made by another user", func(t *testing.T, base string) (string, string) {
			d := filepath.Join(base, "meshid")
			if out, err := asNobody(t, bin, "mkdir", d).CombinedOutput(); err != nil {
				t.Fatalf("attacker mkdir: %v: %s", err, out)
			}
			return filepath.Join(d, "admin", "admin.sock"), d
		}},
		{"socket directory made by another user", func(t *testing.T, base string) (string, string) {
			d := filepath.Join(base, "meshid")
			if out, err := asNobody(t, bin, "mkdir", d).CombinedOutput(); err != nil {
				t.Fatalf("attacker mkdir: %v: %s", err, out)
			}
			return filepath.Join(d, "admin.sock"), d
		}},
		{"root's directory writable by others, not sticky", func(t *testing.T, base string) (string, string) {
			d := filepath.Join(base, "shared")
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(d, 0o777); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(d, "private", "admin.sock"), d
		}},
		{"symlink planted by another user", func(t *testing.T, base string) (string, string) {
			d := filepath.Join(base, "meshid")
			target := filepath.Dir(victim) // root's own, trusted directory
			if out, err := asNobody(t, bin, "symlink", d, target).CombinedOutput(); err != nil {
				t.Fatalf("attacker symlink: %v: %s", err, out)
			}
			return filepath.Join(d, "admin.sock"), d
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := stickyTemp(t)
			socket, bad := tt.setup(t, base)
			l, err := ListenUnix(socket, 0o600, 0o700)
			if err == nil {
				l.Close()
				t.Fatalf("ListenUnix(%s) accepted a directory another user controls (%s)", socket, bad)
			}
			if !strings.Contains(err.Error(), bad+" ") {
				t.Fatalf("error %q does not name the directory %s", err, bad)
			}
			if _, err := os.Lstat(socket); err == nil {
				t.Fatalf("%s was created", socket)
			}
			b, err := os.ReadFile(victim)
			if err != nil || string(b) != "secret" {
				t.Fatalf("victim changed: %q %v", b, err)
			}
			if fi, _ := os.Stat(victim); fi.Mode().Perm() != 0o600 {
				t.Fatalf("victim mode changed to %o", fi.Mode().Perm())
			}
		})
	}
}

func TestListenUnixSetsModesWhateverTheUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	base := stickyTemp(t) // /tmp-like: accepted
	layout := filepath.Join(base, "meshid")
	admin, wl := filepath.Join(layout, "admin", "admin.sock"), filepath.Join(layout, "workload", "workload.sock")
	al, err := ListenUnix(admin, 0o600, 0o700)
	if err != nil {
		t.Fatal(err)
	}
	defer al.Close()
	wll, err := ListenUnix(wl, 0o666, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer wll.Close()
	for path, want := range map[string]os.FileMode{
		admin: os.ModeSocket | 0o600, wl: os.ModeSocket | 0o666,
		filepath.Dir(admin): os.ModeDir | 0o700, filepath.Dir(wl): os.ModeDir | 0o755, layout: os.ModeDir | 0o755,
	} {
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
		}
	}
	// Nothing is left of the private bind directories.
	for _, d := range []string{filepath.Dir(admin), filepath.Dir(wl)} {
		ents, err := os.ReadDir(d)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != 1 {
			t.Errorf("%s holds %d entries, want only the socket", d, len(ents))
		}
	}
}

func TestListenUnixRefusesToReplaceNonSocket(t *testing.T) {
	d := shortTemp(t)
	p := filepath.Join(d, "admin.sock")
	if err := os.WriteFile(p, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := ListenUnix(p, 0o600, 0o700)
	if err == nil {
		l.Close()
		t.Fatal("a regular file at the socket path was replaced")
	}
	if b, _ := os.ReadFile(p); string(b) != "data" {
		t.Fatalf("file changed: %q", b)
	}
}

// runEndpoints runs srv on ep until the test ends.
func runEndpoints(t *testing.T, srv *Server, ep Endpoints) Listening {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, ep, func(l Listening) { ready <- l }) }()
	var l Listening
	select {
	case l = <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	return l
}

func openServer(t *testing.T) *Server {
	t.Helper()
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

func entryFor(t *testing.T, srv *Server, id, selector string) {
	t.Helper()
	typ, val, _ := strings.Cut(selector, ":")
	if _, err := srv.CreateEntry(context.Background(), EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: typ, Value: val}}}, "test"); err != nil {
		t.Fatal(err)
	}
}

// TestWorkloadSocketReachableByAnotherUser runs the default layout (under a
// temp base instead of /run/meshid) and fetches an SVID as uid 65534.
func TestWorkloadSocketReachableByAnotherUser(t *testing.T) {
	bin := binaryFor(t)
	srv := openServer(t)
	const id = "spiffe://cluster.local/ns/default/sa/nobody"
	entryFor(t, srv, id, "unix:uid:65534")
	lay := filepath.Join(shortTemp(t), "meshid")
	l := runEndpoints(t, srv, Endpoints{
		AdminSocket: filepath.Join(lay, "admin", "admin.sock"),
		Socket:      filepath.Join(lay, "workload", "workload.sock"),
	})
	out, err := asNobody(t, bin, "fetch", l.Socket).CombinedOutput()
	if err != nil {
		t.Fatalf("uid 65534 could not fetch its SVID from %s: %v: %s", l.Socket, err, out)
	}
	if got := strings.TrimSpace(string(out)); got != id {
		t.Fatalf("uid 65534 got %q, want %q", got, id)
	}
}

// startFlood runs a child as uid 65534 that dials n connections to socket
// and holds them until the returned stop is called.
func startFlood(t *testing.T, bin, socket string, n int) (stop func()) {
	t.Helper()
	cmd := asNobody(t, bin, "flood", socket, strconv.Itoa(n))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("flood: %v", err)
	}
	t.Logf("flood child: %s", strings.TrimSpace(line))
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("flood child: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}
