package agent_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store/boltstore"
)

// TestReplicaBehindTheStoreAdmitsAFreshAgent: an agent attests on one
// replica, which dies; the replica it fails over to learns of the
// attestation only through its watch, here 2 s late. It must admit the
// agent (deciding on a projection as new as the store), not refuse it as
// evicted: refused so, the agent drops its node SVID and, its token
// spent, can never come back.
func TestReplicaBehindTheStoreAdmitsAFreshAgent(t *testing.T) {
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	kekFile := filepath.Join(dir, "kek")
	a := startPlaneWith(t, controlplane.Config{DataDir: t.TempDir(), Store: sharedStore{bs}, KEKFile: kekFile}, "127.0.0.1:0")
	b := startPlaneWith(t, controlplane.Config{DataDir: t.TempDir(), Store: lagStore{sharedStore{bs}, 2 * time.Second}, KEKFile: kekFile}, "127.0.0.1:0")
	cfg := nodeSetup(t, a, 1, 0)
	cfg.Server = a.agentAddr
	ag, _, stop := runAgent(t, cfg)
	waitFor(t, "the agent on the first replica", ag.Connected)
	serial := nodeSerial(t, cfg.DataDir)
	stop()
	a.stop()

	cfg.JoinToken = "" // spent
	cfg.Server = b.agentAddr
	ag, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent on the lagging replica", ag.Connected)
	if got := nodeSerial(t, cfg.DataDir); got != serial {
		t.Fatalf("node SVID %s, want %s", got, serial)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if got := fetchAll(ctx, t, l.Socket); len(got) != 1 {
		t.Fatalf("served %d SVIDs through the lagging replica, want 1", len(got))
	}
}

// countingProxy forwards TCP connections to target, counting them, until
// the test ends.
type countingProxy struct {
	l     net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	n     int
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *countingProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{l: l}
	p.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.n++
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			p.wg.Go(func() { io.Copy(up, c); up.Close() })
			p.wg.Go(func() { io.Copy(c, up); c.Close() })
		}
	})
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *countingProxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// TestAgentRefusesAnImpostorReplica: a list naming, besides the real
// replica, a server of another CA that has the right SPIFFE ID
// (spiffe://cluster.local/meshid/server). Each address is verified alike:
// with the real one down, a new agent reaches the impostor, refuses its
// SVID before presenting its join token (which the impostor would spend or
// refuse), and attests on the real one once it is up.
func TestAgentRefusesAnImpostorReplica(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	real := startPlaneWith(t, controlplane.Config{DataDir: dir}, "127.0.0.1:0")
	impostor := startProxy(t, startPlane(t, t.TempDir()).agentAddr)
	cfg := nodeSetup(t, real, 1, 0)
	addr := real.agentAddr
	real.stop()
	cfg.Server = impostor.l.Addr().String() + "," + addr
	logs := &logRecords{}
	cfg.Logger = slog.New(logs)
	a, l, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "a round through the impostor", func() bool { return impostor.count() > 0 && len(logs.with("server unreachable")) > 0 })
	if a.Connected() || len(logs.with("attested")) > 0 {
		t.Fatal("attested or connected with only the impostor up")
	}
	real = startPlaneWith(t, controlplane.Config{DataDir: dir}, addr)
	waitFor(t, "the agent on the real replica", func() bool { return a.Server() == addr })
	if got := fetchAll(ctx, t, l.Socket); len(got) != 1 {
		t.Fatalf("served %d SVIDs, want 1", len(got))
	}
	for _, r := range append(logs.with("connected to the server"), logs.with("attested")...) {
		if r["server"] != addr {
			t.Fatalf("the agent dealt with %s, want only the real replica %s: %v", r["server"], addr, r)
		}
	}
}
