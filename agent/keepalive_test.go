package agent_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
)

// blackhole is a TCP proxy to one address that can go silent the way a
// lost machine does: after freeze nothing more is forwarded either way,
// no FIN and no reset reaches either side, and new connections are
// refused. (The kernel still acknowledges what arrives, so TCP alone
// notices nothing for a long time; only an application ping can.)
type blackhole struct {
	t      *testing.T
	ln     net.Listener
	to     string
	frozen chan struct{}
	once   sync.Once
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newBlackhole(t *testing.T, to string) *blackhole {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &blackhole{t: t, ln: ln, to: to, frozen: make(chan struct{})}
	b.wg.Add(1)
	go b.accept()
	t.Cleanup(b.close)
	return b
}

func (b *blackhole) addr() string { return b.ln.Addr().String() }

func (b *blackhole) accept() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", b.to)
		if err != nil {
			c.Close()
			continue
		}
		b.mu.Lock()
		b.conns = append(b.conns, c, u)
		b.mu.Unlock()
		b.wg.Add(2)
		go b.pipe(u, c)
		go b.pipe(c, u)
	}
}

// pipe copies src to dst until freeze; then it holds both open, silent.
func (b *blackhole) pipe(dst, src net.Conn) {
	defer b.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-b.frozen:
			return // what was read is dropped; the sockets stay open
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				b.t.Logf("blackhole: %v", err)
			}
			select {
			case <-b.frozen:
			default:
				dst.Close() // before the freeze, a close passes through
			}
			return
		}
	}
}

// freeze makes the proxy a black hole.
func (b *blackhole) freeze() {
	b.once.Do(func() { close(b.frozen) })
	b.ln.Close()
}

func (b *blackhole) close() {
	b.freeze()
	b.mu.Lock()
	for _, c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// waitLong is waitFor with room for keepalive timers (gRPC's client floor
// is a 10 s interval) on a loaded machine.
func waitLong(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
}

// TestAgentLeavesASilentReplica: the replica an agent is on goes silent
// without closing anything (its machine lost power). The server drops the
// agent's stream on its keepalive (so the agent no longer counts as
// connected there, in `meshid agent list` and the convergence gate), and
// the agent pings, gets no answer and moves to the other replica. Both
// used to wait for TCP's retransmission timeout, about 15 minutes.
func TestAgentLeavesASilentReplica(t *testing.T) {
	fc := fakeclock.New(time.Now().Add(-30 * time.Minute))
	r := startReplicasEndpoints(t, 2, fc, controlplane.Endpoints{AgentListen: "127.0.0.1:0", AgentKeepalive: time.Second})
	// Each replica behind its own proxy: the agent starts at either.
	holes := []*blackhole{newBlackhole(t, r.planes[0].agentAddr), newBlackhole(t, r.planes[1].agentAddr)}
	cfg := nodeSetup(t, r.planes[0], 1, 0)
	cfg.Server = holes[0].addr() + "," + holes[1].addr()
	cfg.Now, cfg.AfterFunc = fc.Now, fc.AfterFunc
	cfg.ServerKeepalive = 10 * time.Second // gRPC's floor
	a, _, stop := runAgent(t, cfg)
	defer stop()
	waitFor(t, "the agent to connect", a.Connected)
	on := 0
	if a.Server() == holes[1].addr() {
		on = 1
	}
	ctx := context.Background()
	streams := func(i int) int {
		info, err := r.planes[i].srv.GetAgent(ctx, a.ID().String())
		if err != nil {
			t.Fatal(err)
		}
		return info.Streams
	}
	waitFor(t, "the agent's Sync stream on its replica", func() bool { return streams(on) == 1 })

	holes[on].freeze()
	waitLong(t, "the silent replica to drop the agent's stream", func() bool { return streams(on) == 0 })
	waitLong(t, "the agent on the other replica", func() bool {
		return a.Connected() && a.Server() == holes[1-on].addr()
	})
	waitFor(t, "the agent's Sync stream on the other replica", func() bool { return streams(1-on) == 1 })
	if got := a.Failovers(); got != 1 {
		t.Fatalf("failovers %d, want 1", got)
	}
}
