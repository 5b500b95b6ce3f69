package bench_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/bench"
)

// startServer runs a real server with a workload socket and an entry for
// this test process (by pid); it returns the socket paths and the metrics
// address.
func startServer(t *testing.T) (socket, admin, metrics string) {
	t.Helper()
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-bench-")
	if err != nil {
		t.Fatal(err)
	}
	ep := controlplane.Endpoints{AdminSocket: filepath.Join(dir, "a.sock"), Socket: filepath.Join(dir, "w.sock"), MetricsListen: "127.0.0.1:0"}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan controlplane.Listening, 1)
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, ep, func(l controlplane.Listening) { ready <- l }) }()
	var l controlplane.Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	})
	sels, err := controlplane.PIDSelectors(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.CreateEntry(context.Background(), controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/bench/sa/load", Selectors: sels}, "test"); err != nil {
		t.Fatal(err)
	}
	return ep.Socket, ep.AdminSocket, "http://" + l.MetricsAddr + "/metrics"
}

func TestSDSStreamsAndPush(t *testing.T) {
	socket, admin, metrics := startServer(t)
	const streams = 50
	res, err := bench.SDS(context.Background(), bench.SDSConfig{
		Socket: socket, Streams: streams, Conns: 10, Duration: 4 * time.Second,
		Push: true, AdminSocket: admin, MetricsURL: metrics, NackEvery: 0,
		Progress: func(line string) { t.Log(line) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v push %+v metrics %+v", res, res.Push, res.Metrics)
	if res.Errors != 0 || res.Ready != streams || res.FirstSecret.Count != streams {
		t.Fatalf("ready %d of %d, errors %d (%s)", res.Ready, streams, res.Errors, res.FirstError)
	}
	if res.Push == nil || res.Push.Targets != streams/2 || res.Push.Got != streams/2 || res.Push.Grew != streams/2 {
		t.Fatalf("push: %+v, want all %d ROOTCA streams to get a bigger bundle", res.Push, streams/2)
	}
	// Only the ROOTCA streams change with a new CA: default is not re-sent.
	if res.Pushes != streams/2 || res.NACKs != 0 {
		t.Fatalf("pushes %d NACKs %d, want %d and 0", res.Pushes, res.NACKs, streams/2)
	}
	if m := res.Metrics; m == nil || m.Up.SDSStreams != streams || m.PerStreamUp.Goroutines <= 0 {
		t.Fatalf("metrics: %+v", res.Metrics)
	}
}

func TestSDSNackEveryAndConnectLoop(t *testing.T) {
	socket, admin, _ := startServer(t)
	res, err := bench.SDS(context.Background(), bench.SDSConfig{
		Socket: socket, Streams: 4, Names: []string{"ROOTCA"}, Duration: 3 * time.Second,
		Push: true, AdminSocket: admin, NackEvery: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	// The second response (the push) is NACKed; the server must not answer
	// a NACK with the same content again.
	if res.Errors != 0 || res.Ready != 4 || res.NACKs != 4 || res.Pushes != 4 || res.Push.Got != 4 {
		t.Fatalf("%+v push %+v", res, res.Push)
	}

	loop, err := bench.SDS(context.Background(), bench.SDSConfig{Socket: socket, ConnectLoop: true, Clients: 8, Duration: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if loop.Errors != 0 || loop.Loop == nil || loop.Loop.Iterations == 0 || loop.FirstSecret.P99 <= 0 {
		t.Fatalf("connect loop: %+v %+v", loop, loop.Loop)
	}

	// Open loop: connects start on a schedule, about rate x duration of them.
	open, err := bench.SDS(context.Background(), bench.SDSConfig{Socket: socket, ConnectLoop: true, Clients: 8, ConnectRate: 100, Duration: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if open.Errors != 0 || open.Loop.Iterations == 0 || open.Loop.Iterations > 110 {
		t.Fatalf("open loop at 100/s for 1s: %d iterations, %d errors", open.Loop.Iterations, open.Errors)
	}
}
