package cli

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store"
)

// TestBenchAgentsCommand runs `meshid bench agents` against a real server
// (admin socket and agent API on loopback): bad flags exit 1 with one line
// and leave the store as it was; a small run exits 0 with its figures.
func TestBenchAgentsCommand(t *testing.T) {
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-cli-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(sockDir, "admin", "admin.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan controlplane.Listening, 1), make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, controlplane.Endpoints{AdminSocket: socket, AgentListen: "127.0.0.1:0"}, func(l controlplane.Listening) { ready <- l })
	}()
	var l controlplane.Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
		os.RemoveAll(sockDir)
	})

	entries := func() int {
		es, _, err := srv.ListEntries(context.Background(), store.EntryQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	for _, args := range [][]string{
		{"--agents", "0"},
		{"--workloads", "-1"},
		{"--fanout", "rotate"},
		{"--concurrency", "0"},
		{"--server", ""},
		{"--timeout", "soon"},
		{"-o", "xml"},
		{"--admin-socket", filepath.Join(sockDir, "nope.sock")},
	} {
		full := append([]string{"bench", "agents", "--server", l.AgentAddr, "--admin-socket", socket}, args...)
		out, errOut, code := run(t, full...)
		if code != 1 || out != "" || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || errOut == "" {
			t.Fatalf("%v: exit %d, stdout %q, stderr %q; want exit 1 and one line", args, code, out, errOut)
		}
	}
	if n := entries(); n != 0 {
		t.Fatalf("bad flags left %d entries", n)
	}

	out, errOut, code := run(t, "bench", "agents", "--server", l.AgentAddr, "--admin-socket", socket, "--agents", "3", "--workloads", "2", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var res struct {
		Agents    int `json:"agents"`
		ColdStart struct {
			Ready int `json:"ready"`
			SVIDs int `json:"svids"`
		} `json:"cold_start"`
		Fanout struct {
			Got int `json:"got"`
		} `json:"fanout"`
		Inventory int `json:"inventory_checked"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if res.Agents != 3 || res.ColdStart.Ready != 3 || res.ColdStart.SVIDs != 6 || res.Fanout.Got != 3 || res.Inventory != 6 {
		t.Fatalf("figures %+v", res)
	}
	if n := entries(); n != 6 {
		t.Fatalf("%d entries after a run of 3 agents x 2 workloads", n)
	}
}
