package cli

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRelativeSocketsAndSpiffeEndpointSocket runs the server and the client
// commands with relative socket paths, and the workload-side commands with
// SPIFFE_ENDPOINT_SOCKET (a flag still wins over it).
func TestRelativeSocketsAndSpiffeEndpointSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "mcli-") // short: socket paths are at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	t.Chdir(dir)
	const admin, socket = "run/admin/admin.sock", "run/workload/workload.sock"
	const id = "spiffe://cluster.local/ns/cli/sa/me"

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srvCtx, stopSrv := context.WithCancel(ctx)
	var srvErr bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Main(srvCtx, []string{"server", "--data-dir", "data", "--admin-socket", admin, "--socket", socket, "--log-level", "warn"}, &bytes.Buffer{}, &srvErr)
	}()
	defer func() {
		stopSrv()
		if code := <-done; code != 0 {
			t.Errorf("server exited %d: %s", code, srvErr.String())
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			break
		}
		select {
		case code := <-done:
			t.Fatalf("server exited %d: %s", code, srvErr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not listen")
		}
		time.Sleep(20 * time.Millisecond)
	}

	run := func(args ...string) (string, string, int) {
		var out, errb bytes.Buffer
		code := Main(ctx, args, &out, &errb)
		return out.String(), errb.String(), code
	}
	if _, stderr, code := run("entry", "create", "--admin-socket", admin, "--spiffe-id", id, "--selector", "unix:uid:0"); code != 0 {
		t.Fatalf("entry create with a relative --admin-socket: exit %d: %s", code, stderr)
	}

	abs, err := filepath.Abs(socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(spiffeEndpointSocketEnv, "unix://"+abs)
	if _, stderr, code := run("helper", "--dir", "env", "--once"); code != 0 {
		t.Fatalf("helper with SPIFFE_ENDPOINT_SOCKET: exit %d: %s", code, stderr)
	}
	checkSVIDFile(t, "env/svid.pem", id)
	out, stderr, code := run("envoy", "bootstrap", "--spiffe-id", id)
	if code != 0 || !strings.Contains(out, "path: "+abs) {
		t.Fatalf("envoy bootstrap does not use SPIFFE_ENDPOINT_SOCKET %s: exit %d %s\n%s", abs, code, stderr, out)
	}

	t.Setenv(spiffeEndpointSocketEnv, "unix:///nonexistent/workload.sock")
	if _, stderr, code := run("helper", "--socket", socket, "--dir", "flag", "--once"); code != 0 {
		t.Fatalf("helper --socket (relative) over SPIFFE_ENDPOINT_SOCKET: exit %d: %s", code, stderr)
	}
	checkSVIDFile(t, "flag/svid.pem", id)

	t.Setenv(spiffeEndpointSocketEnv, "tcp://127.0.0.1:1")
	if _, stderr, code := run("helper", "--dir", "tcp", "--once"); code != 1 || !strings.Contains(stderr, spiffeEndpointSocketEnv) {
		t.Fatalf("a tcp SPIFFE_ENDPOINT_SOCKET: exit %d: %s", code, stderr)
	}
}

func checkSVIDFile(t *testing.T, path, id string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != id {
		t.Fatalf("%s: URIs %v, want %s", path, c.URIs, id)
	}
}
