package workload_test

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
	"sync/atomic"
	"syscall"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/sds"
)

// attestEnv selects a helper mode of the test binary for the attestation
// tests: "fetch:<socket>" prints the SPIFFE IDs of its X.509-SVIDs (or
// "error <code>"); "connect:<socket>" connects its fd 3 to the socket,
// says "connected" and exits when stdin closes, leaving that connection
// to the parent, whose end it is.
const attestEnv = "MESHID_WL_ATTEST"

func attestChildMain() int {
	mode, socket, _ := strings.Cut(os.Getenv(attestEnv), ":")
	switch mode {
	case "fetch":
		ctx, cancel := context.WithTimeout(context.Background(), waitLong)
		defer cancel()
		svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr("unix://"+socket))
		if err != nil {
			fmt.Println("error", status.Code(err))
			return 0
		}
		for _, s := range svids {
			fmt.Println(s.ID)
		}
		return 0
	case "connect":
		if err := unix.Connect(3, &unix.SockaddrUnix{Name: socket}); err != nil {
			fmt.Fprintln(os.Stderr, "connect:", err)
			return 2
		}
		fmt.Println("connected")
		io.Copy(io.Discard, os.Stdin)
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown mode", mode)
	return 2
}

// A stream whose peer process has died gets nothing more: the connection
// was made by a child that has exited (its socket lives on in this
// process, as one inherited by another process would), and a change that
// would be pushed to it ends its Workload API and SDS streams with
// PermissionDenied; a JWT-SVID is refused. A live caller's stream on the
// same server gets the same change.
func TestDeadCallerGetsNothingMore(t *testing.T) {
	h := startServer(t, controlplane.Config{})

	// The child connects a socket made here, then stays until stdin closes.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sockFile := os.NewFile(uintptr(fd), "child-conn")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), attestEnv+"=connect:"+h.socket)
	cmd.ExtraFiles = []*os.File{sockFile}
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
	reaped := false
	t.Cleanup(func() {
		if !reaped {
			stdin.Close()
			cmd.Wait()
		}
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("child said %q: %v", line, err)
	}
	childConn, err := net.FileConn(sockFile)
	sockFile.Close()
	if err != nil {
		t.Fatal(err)
	}
	var dialed atomic.Bool
	cc, err := grpc.NewClient("passthrough:///child", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			if dialed.Swap(true) {
				return nil, errors.New("the child's one connection is gone")
			}
			return childConn, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	dead := pb.NewSpiffeWorkloadAPIClient(cc)
	deadSDS := secretv3.NewSecretDiscoveryServiceClient(cc)

	h.entry(t, idA, pidSelector(cmd.Process.Pid))
	h.entry(t, idB, pidSelector(os.Getpid()))
	ctx := withHeader(testCtx(t))

	deadX509, err := dead.FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := deadX509.Recv(); err != nil || ids(r) != idA {
		t.Fatalf("child's first response: %v %v, want %s", ids(r), err, idA)
	}
	// SDS asks for the default SVID and for idC, which it does not hold
	// yet: granting it is a change that is pushed.
	deadSecrets, err := deadSDS.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := &discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "child"}, TypeUrl: sds.SecretTypeURL, ResourceNames: []string{"default", idC}}
	if err := deadSecrets.Send(req); err != nil {
		t.Fatal(err)
	}
	first, err := deadSecrets.Recv()
	if err != nil || len(first.GetResources()) != 1 {
		t.Fatalf("child's first SDS response: %v resources, %v; want 1 (default)", len(first.GetResources()), err)
	}
	if err := deadSecrets.Send(&discoveryv3.DiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResourceNames: req.ResourceNames, VersionInfo: first.GetVersionInfo(), ResponseNonce: first.GetNonce()}); err != nil {
		t.Fatal(err)
	}

	live, err := h.raw(t).FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := live.Recv(); err != nil || ids(r) != idB {
		t.Fatalf("live caller's first response: %v %v, want %s", ids(r), err, idB)
	}

	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	reaped = true

	// One change for both callers: every local process of this uid gets idC.
	h.entry(t, idC, "unix:uid:"+strconv.Itoa(os.Getuid()))
	if r, err := live.Recv(); err != nil || ids(r) != idC+" "+idB {
		t.Fatalf("live caller after the change: %v %v, want %s %s", ids(r), err, idB, idC)
	}
	if r, err := deadX509.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("dead caller's X.509 stream after the change: %v %v, want PermissionDenied", ids(r), err)
	}
	if r, err := deadSecrets.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("dead caller's SDS stream after the change: %d resources, %v; want PermissionDenied", len(r.GetResources()), err)
	}
	if r, err := dead.FetchJWTSVID(ctx, &pb.JWTSVIDRequest{Audience: []string{"db"}}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("dead caller's JWT-SVID: %d SVIDs, %v; want PermissionDenied", len(r.GetSvids()), err)
	}
	// A new stream on the dead caller's connection is refused too.
	s, err := dead.FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("new stream of the dead caller: %v %v, want PermissionDenied", ids(r), err)
	}
}

// ids lists the SPIFFE IDs of a response, sorted and space-separated.
func ids(r *pb.X509SVIDResponse) string {
	var out []string
	for _, s := range r.GetSvids() {
		out = append(out, s.GetSpiffeId())
	}
	slices.Sort(out)
	return strings.Join(out, " ")
}

// unix:path and unix:sha256 entries match a real process of another user
// by the executable it runs, and not a process running another one: a
// copy of the test binary (same digest, other path) gets only the digest's
// identity, and one with a byte added gets neither.
func TestExecutableSelectors(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	// uid 65534 must reach the socket and the binaries.
	if err := os.Chmod(filepath.Dir(h.socket), 0o755); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-exe-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(bin)
	digest := hex.EncodeToString(sum[:])
	write := func(name string, content []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	binA := write("a", bin)
	binCopy := write("copy", bin)
	binOther := write("other", append(slices.Clone(bin), 0)) // an ELF runs with bytes appended

	h.entry(t, idA, "unix:path:"+binA)
	h.entry(t, idB, "unix:sha256:"+digest)

	run := func(bin string) string {
		t.Helper()
		cmd := exec.Command(bin, "-test.run=^$")
		cmd.Env = append(os.Environ(), attestEnv+"=fetch:"+h.socket)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s as uid 65534: %v", bin, err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		slices.Sort(lines)
		return strings.Join(lines, " ")
	}
	for _, c := range []struct{ bin, want string }{
		{binA, idB + " " + idA}, // sorted: .../db before .../web
		{binCopy, idB},
		{binOther, "error PermissionDenied"},
	} {
		if got := run(c.bin); got != c.want {
			t.Errorf("%s (uid 65534) got %q, want %q", filepath.Base(c.bin), got, c.want)
		}
	}
}
