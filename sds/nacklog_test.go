package sds_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/ratelog"
	"github.com/meshid/meshid/sds"
)

// lockedBuffer is a log sink written by the server's goroutines and read by
// the test.
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

func (l *lockedBuffer) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// TestNACKFloodLogIsBounded: a caller with no identity that NACKs in a
// loop with a huge error_detail used to grow the log by its own volume
// (190 MiB/s). The NACK lines are truncated and rate-limited per caller,
// and the next line let through says how many were left out.
func TestNACKFloodLogIsBounded(t *testing.T) {
	cp, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Close()
	var logBuf lockedBuffer
	caller := identity.Caller{Selectors: []string{"unix:uid:65534"}, Label: "uid:65534 gid:65534"}
	srv := sds.New(cp, func(context.Context) (identity.Caller, error) { return caller, nil },
		slog.New(slog.NewTextHandler(&logBuf, nil)), sds.NewMetrics(nil))
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	sds.SetClientLogClock(srv, func() time.Time { mu.Lock(); defer mu.Unlock(); return now })

	dir, err := os.MkdirTemp("", "meshid-nack-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "sds.sock")
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	srv.Register(gs)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	defer func() { srv.Shutdown(); gs.Stop(); <-served }()

	// Driven as Envoy does: the first request, then a NACK of the
	// response it got, carrying that response's nonce, over and over.
	client := openSotW(t, dialSDS(t, socket), "flood", "default", "ROOTCA")
	resp := client.recv()
	const (
		nacks  = 1000
		detail = 100 << 10
	)
	big := strings.Repeat("x", detail)
	for range nacks {
		client.nack(resp, big)
	}
	waitNACKs(t, srv, nacks)
	if n := logBuf.Len(); n > 8*ratelog.Burst*1024 {
		t.Fatalf("%d NACKs of %d KB made %d bytes of log, want a few KB", nacks, detail>>10, n)
	}
	// The caller's refused "default" and its NACKs share one budget.
	if got := strings.Count(logBuf.String(), "\n"); got != ratelog.Burst {
		t.Fatalf("%d lines logged, want the per-caller burst %d:\n%s", got, ratelog.Burst, logBuf.String())
	}
	nackLines := strings.Count(logBuf.String(), "(NACK)")

	mu.Lock()
	now = now.Add(ratelog.Interval)
	mu.Unlock()
	client.nack(resp, big)
	waitNACKs(t, srv, nacks+1)
	// The counter moves before the line is written: wait for the line.
	lines := ratelog.Burst
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(logBuf.String(), "\n") == lines {
		if time.Now().After(deadline) {
			t.Fatalf("no NACK line in the next interval:\n%s", logBuf.String())
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
	}
	if want := "suppressed=" + strconv.Itoa(nacks-nackLines); !strings.Contains(logBuf.String(), want) {
		t.Fatalf("the first NACK line of the next interval does not say %s:\n%s", want, logBuf.String())
	}
}

// waitNACKs polls the server's NACK counter until it reaches n.
func waitNACKs(t *testing.T, srv *sds.Server, n float64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for sds.NACKCount(srv) < n {
		if time.Now().After(deadline) {
			t.Fatalf("server counted %v NACKs, want %v", sds.NACKCount(srv), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
