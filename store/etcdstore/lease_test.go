package etcdstore

import (
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// proxy forwards loopback TCP to target until cut, which closes every
// connection and refuses new ones until heal: a replica cut off from etcd.
type proxy struct {
	t      *testing.T
	target string
	l      net.Listener
	mu     sync.Mutex
	cutoff bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{t: t, target: target, l: l}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		l.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) url() string { return "http://" + p.l.Addr().String() }

func (p *proxy) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cutoff {
			p.mu.Unlock()
			c.Close()
			continue
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		p.wg.Go(func() { _, _ = io.Copy(u, c); u.Close() })
		p.wg.Go(func() { _, _ = io.Copy(c, u); c.Close() })
	}
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cutoff = true
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) heal() {
	p.mu.Lock()
	p.cutoff = false
	p.mu.Unlock()
}

// TestLeaseLostWhenCutOff cuts the leader off from etcd: its lease
// expires, the other replica leads within the lease TTL (plus a second),
// the cut-off one's Done closes, and once it reaches etcd again its PutCA
// is refused with ErrNotLeader, so it cannot write a second prepared CA.
func TestLeaseLostWhenCutOff(t *testing.T) {
	b := openShared(t, Options{Replica: "b"})
	px := newProxy(t, b.opts.Endpoints[0][len("http://"):])
	a, err := Open(bg, Options{Endpoints: []string{px.url()}, Prefix: b.k.p, Replica: "a", LeaseTTL: 2 * time.Second, RequestTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	la, err := a.Campaign(bg)
	if err != nil {
		t.Fatal(err)
	}
	bLeads := make(chan error, 1)
	go func() { _, err := b.Campaign(bg); bLeads <- err }()
	waitFor(t, func() bool {
		st, err := b.Cluster(bg)
		return err == nil && st.Leader == "a"
	})
	px.cut()
	cut := time.Now()
	select {
	case err := <-bLeads:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(a.opts.LeaseTTL + 5*time.Second):
		t.Fatal("b did not lead after a was cut off")
	}
	took := time.Since(cut)
	// The goal is TTL + 1 s (etcd checks expiry every 500 ms); the bound
	// leaves a second more for a loaded 2-core machine under -race.
	if took > a.opts.LeaseTTL+2*time.Second {
		t.Fatalf("takeover took %v, lease TTL %v", took, a.opts.LeaseTTL)
	}
	t.Logf("takeover %v after the leader was cut off", took)
	select {
	case <-la.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("cut-off leader's Done not closed")
	}
	ca := store.CARecord{ID: "second", Kind: "x509", State: store.CAPrepared, CreatedAt: t0}
	if err := a.PutCA(bg, ca, nil); err == nil {
		t.Fatal("cut-off former leader wrote a CA")
	}
	px.heal()
	waitFor(t, func() bool { return a.Health() == nil })
	if err := a.PutCA(bg, ca, nil); !errors.Is(err, store.ErrNotLeader) {
		t.Fatalf("former leader's PutCA: %v, want ErrNotLeader", err)
	}
	if cas, _ := b.ListCAs(bg); len(cas) != 0 {
		t.Fatalf("CAs written: %+v", cas)
	}
}
