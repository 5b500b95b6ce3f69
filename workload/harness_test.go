package workload_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/workload"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	if os.Getenv(attestEnv) != "" {
		os.Exit(attestChildMain())
	}
	goleak.VerifyTestMain(m)
}

const (
	idA = "spiffe://cluster.local/ns/shop/sa/web"
	idB = "spiffe://cluster.local/ns/shop/sa/db"
	idC = "spiffe://cluster.local/ns/shop/sa/batch"
)

// waitLong bounds every wait on an event; generous, so a slow machine
// fails on a real bug, not on timing.
const waitLong = 20 * time.Second

type harness struct {
	srv    *controlplane.Server
	socket string
	wl     *workload.Server
}

// unixCaller is the workload socket's attestation, as the server wires it:
// the kernel-verified peer credentials and the tracked process, the one
// path SDS also uses.
func unixCaller(ctx context.Context) (identity.Caller, error) {
	return attest.CallerFromContext(ctx)
}

// startServer runs a real server with SDS and the Workload API on one
// unix socket, served as controlplane serves its workload socket. It makes
// no entries.
func startServer(t *testing.T, cfg controlplane.Config) *harness {
	t.Helper()
	cfg.DataDir = t.TempDir()
	if cfg.CATTL == 0 {
		cfg.CATTL = 24 * time.Hour
	}
	if cfg.SVIDTTL == 0 {
		cfg.SVIDTTL = time.Hour
	}
	srv, err := controlplane.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-wl-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{srv: srv, socket: filepath.Join(dir, "w.sock")}
	lis, err := controlplane.ListenUnix(h.socket, 0o666, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(attest.UnixCredentials()))
	sdsSrv := sds.New(srv, unixCaller, nil, nil)
	sdsSrv.Register(gs)
	h.wl = workload.New(srv, unixCaller, nil)
	h.wl.Register(gs)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	t.Cleanup(func() {
		h.wl.Shutdown()
		sdsSrv.Shutdown()
		gs.GracefulStop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	})
	return h
}

func pidSelector(pid int) string { return "unix:pid:" + strconv.Itoa(pid) }

// entry registers id for selector and returns the entry ID (the hint).
func (h *harness) entry(t *testing.T, id, selector string) string {
	t.Helper()
	sels, err := testSelectors(selector)
	if err != nil {
		t.Fatal(err)
	}
	e, err := h.srv.CreateEntry(context.Background(), controlplane.EntrySpec{SpiffeID: id, Selectors: sels}, "test")
	if err != nil {
		t.Fatal(err)
	}
	return e.ID
}

func (h *harness) addr() string { return "unix://" + h.socket }

func (h *harness) clientOpts() workloadapi.ClientOption { return workloadapi.WithAddr(h.addr()) }

// client is go-spiffe's Workload API client on the harness socket.
func (h *harness) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), h.clientOpts())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw is a plain generated gRPC client: it sends no header unless told.
func (h *harness) raw(t *testing.T) pb.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+h.socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", h.socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewSpiffeWorkloadAPIClient(conn)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	t.Cleanup(cancel)
	return ctx
}

// testSelectors parses one selector; a unix:pid one also gets the uid that
// owns the process, which the server requires beside a pid.
func testSelectors(selector string) ([]store.Selector, error) {
	if pid, ok := strings.CutPrefix(selector, "unix:pid:"); ok {
		n, err := strconv.Atoi(pid)
		if err != nil {
			return nil, err
		}
		return controlplane.PIDSelectors(n)
	}
	sel, err := controlplane.ParseSelector(selector)
	return []store.Selector{sel}, err
}
