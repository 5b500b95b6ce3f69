package workload_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/ratelog"
	"github.com/meshid/meshid/workload"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRefusalLogIsBounded: a caller that asks in a loop for what it cannot
// have, with huge values, gets a few truncated log lines per interval, and
// the next interval's first line counts what was left out.
func TestRefusalLogIsBounded(t *testing.T) {
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir, err := os.MkdirTemp("", "meshid-wl-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	h := &harness{srv: srv, socket: filepath.Join(dir, "w.sock")}
	lis, err := controlplane.ListenUnix(h.socket, 0o666, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	var logBuf lockedBuffer
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	gs := grpc.NewServer(grpc.Creds(attest.UnixCredentials()))
	wl := workload.New(srv, unixCaller, slog.New(slog.NewTextHandler(&logBuf, nil)))
	workload.SetClientLogClock(wl, func() time.Time { mu.Lock(); defer mu.Unlock(); return now })
	wl.Register(gs)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	defer func() { wl.Shutdown(); gs.Stop(); <-served }()

	c := h.raw(t)
	ctx := withHeader(testCtx(t))
	big := strings.Repeat("a", 1900) // under the SPIFFE limit of 2048 bytes, far over a log line's share
	const calls = 300
	for range calls {
		// This process has no entry: every call is refused.
		_, err := c.FetchJWTSVID(ctx, &pb.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://cluster.local/" + big})
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("FetchJWTSVID for an ID the caller does not hold: %v, want PermissionDenied", err)
		}
	}
	if n := len(logBuf.String()); n > 2*ratelog.Burst*1024 {
		t.Fatalf("%d refusals with a 1.9 KB SPIFFE ID made %d bytes of log, want a few KB", calls, n)
	}
	if got := strings.Count(logBuf.String(), "\n"); got != ratelog.Burst {
		t.Fatalf("%d lines logged, want the per-caller burst %d:\n%s", got, ratelog.Burst, logBuf.String())
	}
	mu.Lock()
	now = now.Add(ratelog.Interval)
	mu.Unlock()
	_, _ = c.FetchJWTSVID(ctx, &pb.JWTSVIDRequest{Audience: []string{"x"}, SpiffeId: "spiffe://cluster.local/" + big})
	if want := "suppressed=" + strconv.Itoa(calls-ratelog.Burst); !strings.Contains(logBuf.String(), want) {
		t.Fatalf("the first line of the next interval does not say %s:\n%s", want, logBuf.String())
	}
}
