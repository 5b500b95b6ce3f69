package agent_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// exiting is an agent run whose end (Run's error) the test waits for.
type exiting struct {
	a    *agent.Agent
	sock string
	done chan struct{}
	err  error
	stop func()
}

func runExiting(t *testing.T, cfg agent.Config) *exiting {
	t.Helper()
	a, err := agent.Open(cfg)
	if err != nil {
		t.Fatalf("open agent: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan agent.Listening, 1)
	r := &exiting{a: a, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = a.Run(ctx, func(l agent.Listening) { ready <- l })
	}()
	select {
	case l := <-ready:
		r.sock = l.Socket
	case <-r.done:
		t.Fatalf("agent run: %v", r.err)
	}
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			<-r.done
			a.Close()
		})
	}
	t.Cleanup(r.stop)
	return r
}

// exit waits for Run to return by itself and returns its error.
func (r *exiting) exit(t *testing.T, after string) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(20 * time.Second):
		t.Fatalf("the agent kept running 20s after %s", after)
		return nil
	}
}

// manageSetup is a server with one entry for this uid, a data dir on which
// agent web-1 has attested (and stopped), and the agent's config for a
// restart without a token.
func manageSetup(t *testing.T) (*plane, agent.Config) {
	t.Helper()
	ctx := context.Background()
	p := startPlane(t, t.TempDir())
	if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "test"); err != nil {
		t.Fatal(err)
	}
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	trust, err := os.ReadFile(p.bundle)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := agent.ParseBundlePEM(trust)
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: certs, DataDir: t.TempDir(), Socket: filepath.Join(sockDir, "workload.sock")}
	a, _, stop := runAgent(t, cfg)
	waitFor(t, "the agent to connect", a.Connected)
	stop()
	cfg.JoinToken, cfg.TrustBundle = "", nil
	return p, cfg
}

func nodeSerial(t *testing.T, dataDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "node.crt"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("node.crt is not PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber.Text(16)
}

// TestAgentEvictedWithoutTokenExits: evicted, an agent that has no join
// token to attest again with drops its node SVID (memory and data dir)
// and exits with one line naming the command that makes a token, instead
// of retrying a node SVID the server refuses for ever.
func TestAgentEvictedWithoutTokenExits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, cfg := manageSetup(t)
	r := runExiting(t, cfg)
	waitFor(t, "the agent to connect", r.a.Connected)
	if _, err := p.srv.EvictAgent(ctx, "web-1", "test"); err != nil {
		t.Fatal(err)
	}
	err := r.exit(t, "its eviction")
	if err == nil || !strings.Contains(err.Error(), "evicted") || !strings.Contains(err.Error(), "meshid token create --agent") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("evicted agent without a token ended with %v, want one line saying evicted and naming meshid token create --agent", err)
	}
	for _, f := range []string{"node.crt", "node.key"} {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after the eviction: %v, want it removed", f, err)
		}
	}
	if !r.a.ID().IsZero() {
		t.Errorf("the evicted agent still holds node SVID %s in memory", r.a.ID())
	}
	// A restart does not present the refused SVID again: it needs a token.
	r.stop() // releases the data dir
	if a, err := agent.Open(cfg); err == nil {
		a.Close()
		t.Fatal("an agent opened on the evicted data dir without a token")
	} else if !strings.Contains(err.Error(), "meshid token create --agent") {
		t.Fatalf("open after eviction: %v", err)
	}
}

// TestAgentEvictedAttestsAgainWithToken: evicted, an agent given a join
// token (unspent: the data dir held an identity, so this start did not use
// it) attests again at once, as the same node with a new node SVID, and
// goes on serving and signing.
func TestAgentEvictedAttestsAgainWithToken(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, cfg := manageSetup(t)
	before := nodeSerial(t, cfg.DataDir)
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	cfg.JoinToken = tok
	r := runExiting(t, cfg)
	waitFor(t, "the agent to connect", r.a.Connected)
	if got := nodeSerial(t, cfg.DataDir); got != before {
		t.Fatalf("the agent attested at start (node SVID %s, was %s) though its data dir held an identity", got, before)
	}
	if _, err := p.srv.EvictAgent(ctx, "web-1", "test"); err != nil {
		t.Fatal(err)
	}
	// The record comes back only through a new attestation.
	waitFor(t, "the evicted agent to attest again and reconnect", func() bool {
		select {
		case <-r.done:
			t.Fatalf("the evicted agent with a token exited: %v", r.err)
		default:
		}
		_, err := p.srv.GetAgent(ctx, "web-1")
		return err == nil && r.a.Connected()
	})
	if got := nodeSerial(t, cfg.DataDir); got == before {
		t.Fatal("after attesting again the data dir still holds the evicted node SVID")
	}
	if got := r.a.ID().String(); got != "spiffe://cluster.local/meshid/agent/join/web-1" {
		t.Fatalf("attested again as %s", got)
	}
	// Signing works on the new node SVID: an entry made now is served.
	if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/ns/shop/sa/after",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the entry made after the re-attestation to be served", func() bool {
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		defer fcancel()
		svids, err := workloadapi.FetchX509SVIDs(fctx, workloadapi.WithAddr("unix://"+r.sock))
		return err == nil && len(svids) == 2
	})
}

// TestAgentBannedExits: banned, the agent exits saying so (an operator's
// decision no retry can change), and a restart on the same data dir exits
// the same way as soon as it reaches the server.
func TestAgentBannedExits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, cfg := manageSetup(t)
	r := runExiting(t, cfg)
	waitFor(t, "the agent to connect", r.a.Connected)
	if _, _, err := p.srv.BanAgent(ctx, "web-1", "test"); err != nil {
		t.Fatal(err)
	}
	check := func(err error) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "banned") || !strings.Contains(err.Error(), "meshid agent unban") || strings.Contains(err.Error(), "\n") {
			t.Fatalf("banned agent ended with %v, want one line saying banned and naming meshid agent unban", err)
		}
	}
	check(r.exit(t, "its ban"))
	r.stop() // releases the data dir
	// What it held was revoked with the ban: nothing of it stays on disk
	// for a restart (in a server outage) to serve.
	for _, f := range []string{agent.CacheFile, "node.crt", "node.key"} {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still in the data dir after the ban: %v", f, err)
		}
	}
	// A restart has nothing to come back with: it needs a new token,
	// which a banned node is refused until unbanned.
	if a, err := agent.Open(cfg); err == nil || !strings.Contains(err.Error(), "join token") {
		if a != nil {
			a.Close()
		}
		t.Fatalf("restart after the ban: %v, want a refusal asking for a join token", err)
	}
}

// TestAgentKeepsIdentityWhenRenewalsDropItsFirstNodeSVID: the server ends
// a Sync stream whose node SVID its record no longer lists ("evicted:
// attest again"), which renewals alone bring about (the record keeps the
// newest few). The agent, holding a newer node SVID than the one the
// stream was opened with, reconnects with it instead of dropping its
// identity as an evicted agent does. Renewals follow the availability
// target's policy: a tenth of the node SVID's life here (1 h, target 12 h).
func TestAgentKeepsIdentityWhenRenewalsDropItsFirstNodeSVID(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// In the past, so that certificates made on it are valid for TLS
	// (the real clock) through the renewals stepped below.
	fc := fakeclock.New(time.Now().Add(-50 * time.Minute))
	p := startPlaneWith(t, controlplane.Config{DataDir: t.TempDir(), Now: fc.Now, AfterFunc: fc.AfterFunc}, "127.0.0.1:0")
	tok, _, err := p.srv.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	logs := &syncBuffer{}
	cfg := agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: p.srv.BundleCerts(), DataDir: t.TempDir(),
		Socket: filepath.Join(sockDir, "workload.sock"), Now: fc.Now, AfterFunc: fc.AfterFunc,
		Logger: slog.New(slog.NewTextHandler(logs, nil))}
	r := runExiting(t, cfg)
	waitFor(t, "the agent to connect", r.a.Connected)
	first := nodeSerial(t, cfg.DataDir)
	// Eight renewals push the first node SVID out of the record.
	prev := first
	for i := range 9 {
		fc.Advance(6*time.Minute + time.Second)
		waitFor(t, "node SVID renewal "+strconv.Itoa(i+1), func() bool {
			select {
			case <-r.done:
				t.Fatalf("the agent exited: %v\n%s", r.err, logs)
			default:
			}
			s := nodeSerial(t, cfg.DataDir)
			if s != prev {
				prev = s
				return true
			}
			return false
		})
	}
	waitFor(t, "the stream on the first node SVID to end and the agent to reconnect", func() bool {
		return strings.Contains(logs.String(), "refused an earlier node SVID") && r.a.Connected()
	})
	select {
	case <-r.done:
		t.Fatalf("the agent exited: %v", r.err)
	default:
	}
	if _, err := p.srv.GetAgent(ctx, "web-1"); err != nil {
		t.Fatalf("the agent's record after its renewals: %v", err)
	}
	if got := nodeSerial(t, cfg.DataDir); got != prev {
		t.Fatalf("node SVID %s after reconnecting, want the renewed %s (no new attestation)", got, prev)
	}
	if strings.Count(logs.String(), "msg=attested") != 1 {
		t.Fatalf("the agent attested again:\n%s", logs)
	}
}
