// Package e2e runs the meshid binary as a user would: real processes, real
// sockets, real signals. The test binary doubles as the meshid binary: with
// MESHID_E2E_EXEC=1 it runs the CLI instead of the tests, so no separate
// build step is needed.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/cli"
	"github.com/meshid/meshid/internal/k8stest"
)

func TestMain(m *testing.M) {
	if os.Getenv("MESHID_E2E_EXEC") == "1" {
		ctx, stop := signalContext()
		code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	code := m.Run()
	// The Kubernetes tests' shared client keeps a connection to the test
	// bed for the whole run; it is closed before goroutines are counted.
	k8stest.CloseIdle()
	if code == 0 {
		if err := k8stest.FindLeaks(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: errors on successful test run: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// proc is a meshid subprocess.
type proc struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr bytes.Buffer
	lines  chan string
	done   chan struct{}
	err    error
}

// startMeshid starts `meshid args...` and streams its stderr lines.
func startMeshid(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "MESHID_E2E_EXEC=1")
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, lines: make(chan string, 1024), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(errPipe)
		for sc.Scan() {
			p.mu.Lock()
			p.stderr.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
	})
	return p
}

// waitLine blocks like waitFor and returns the first line containing s.
func (p *proc) waitLine(t *testing.T, s string) string {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, s) {
				return l
			}
		case <-p.done:
			t.Fatalf("meshid exited (%v) before logging %q:\n%s", p.err, s, p.output())
		case <-deadline:
			t.Fatalf("meshid did not log %q within 30s:\n%s", s, p.output())
		}
	}
}

// waitFor blocks until a stderr line contains s, the process exits, or the
// deadline passes.
func (p *proc) waitFor(t *testing.T, s string) {
	t.Helper()
	p.waitLine(t, s)
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("meshid did not exit within 30s:\n%s", p.output())
	}
	return p.cmd.ProcessState.ExitCode()
}

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// runCLI runs one meshid client command in-process, as a script would.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	code = cli.Main(ctx, args, &out, &errb)
	return out.String(), errb.String(), code
}

// sockDir returns a short directory for unix sockets (108-byte path limit).
func sockDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "meshid-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "private")
}
