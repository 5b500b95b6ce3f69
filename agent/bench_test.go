package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/controlplane"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// benchAgent is a server and one connected agent, in this process.
func benchAgent(b *testing.B) (*plane, *agent.Agent, string) {
	b.Helper()
	p := startPlane(b, b.TempDir())
	tok, _, err := p.srv.CreateAgentToken(context.Background(), "bench", time.Hour, "bench")
	if err != nil {
		b.Fatal(err)
	}
	trust, err := os.ReadFile(p.bundle)
	if err != nil {
		b.Fatal(err)
	}
	certs, err := agent.ParseBundlePEM(trust)
	if err != nil {
		b.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-agent-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(sockDir) })
	a, err := agent.Open(agent.Config{Server: p.agentAddr, JoinToken: tok, TrustBundle: certs, DataDir: b.TempDir(), Socket: filepath.Join(sockDir, "w.sock")})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan agent.Listening, 1)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx, func(l agent.Listening) { ready <- l }) }()
	l := <-ready
	b.Cleanup(func() { cancel(); <-done; a.Close() })
	for deadline := time.Now().Add(20 * time.Second); !a.Connected(); {
		if time.Now().After(deadline) {
			b.Fatal("agent never connected")
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	return p, a, l.Socket
}

func percentiles(b *testing.B, d []time.Duration) {
	slices.Sort(d)
	if len(d) == 0 {
		return
	}
	b.ReportMetric(float64(d[len(d)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(d[len(d)*99/100].Microseconds())/1000, "ms-p99")
}

// BenchmarkAgentFirstSVID: a go-spiffe FetchX509SVID on the agent's
// socket, connect to SVID, warm (the SVID is in the agent's cache).
func BenchmarkAgentFirstSVID(b *testing.B) {
	p, _, sock := benchAgent(b)
	ctx := context.Background()
	if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/bench/warm",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}}}, "bench"); err != nil {
		b.Fatal(err)
	}
	// A watcher keeps the slot warm, as a long-lived proxy would.
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.FetchX509SVID(ctx); err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock)); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	percentiles(b, lat)
}

// BenchmarkAgentEntryToSVID: a workload already waiting on the agent's
// socket; from CreateEntry on the server until the workload holds the
// entry's SVID (pushed to the agent, key made there, CSR signed).
func BenchmarkAgentEntryToSVID(b *testing.B) {
	p, _, sock := benchAgent(b)
	ctx := context.Background()
	uid := strconv.Itoa(os.Getuid())
	// The workload holds one identity already, so its stream is open: a
	// workload with none is refused (the SPIFFE Workload API spec) and
	// go-spiffe retries after its backoff, about a second.
	if _, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/bench/base",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + uid}}}, "bench"); err != nil {
		b.Fatal(err)
	}
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+sock))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.FetchX509SVID(ctx); err != nil {
		b.Fatal(err)
	}
	updates := make(chan *workloadapi.X509Context, 64)
	wctx, wcancel := context.WithCancel(ctx)
	watching := make(chan error, 1)
	go func() { watching <- c.WatchX509Context(wctx, ctxWatcher{updates}) }()
	defer func() { wcancel(); <-watching }()
	var lat []time.Duration
	i := 0
	b.ResetTimer()
	for b.Loop() {
		i++
		id := "spiffe://cluster.local/bench/e" + strconv.Itoa(i)
		start := time.Now()
		// A selector set of its own each time, so each entry is new to
		// the workload (which holds uid:<uid> and is matched by all).
		e, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: "uid:" + uid}}}, "bench")
		if err != nil {
			b.Fatal(err)
		}
	wait:
		for {
			select {
			case x := <-updates:
				for _, s := range x.SVIDs {
					if s.ID.String() == id {
						break wait
					}
				}
			case <-time.After(30 * time.Second):
				b.Fatal("the new entry's SVID never reached the workload")
			}
		}
		lat = append(lat, time.Since(start))
		b.StopTimer()
		if _, _, err := p.srv.DeleteEntry(ctx, e.ID, "bench"); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	percentiles(b, lat)
}

type ctxWatcher struct{ ch chan *workloadapi.X509Context }

func (w ctxWatcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	select {
	case w.ch <- x:
	default:
	}
}
func (ctxWatcher) OnX509ContextWatchError(error) {}

// BenchmarkAgentBatchSign: SignX509SVIDs batches of 500 CSRs over the
// agent API (mTLS with a node SVID), every SVID's row durable in the
// inventory before it is returned; reports SVIDs per second.
func BenchmarkAgentBatchSign(b *testing.B) {
	for _, fast := range []bool{false, true} {
		b.Run(fmt.Sprintf("fast-sign=%v", fast), func(b *testing.B) { benchBatchSign(b, fast) })
	}
}

func benchBatchSign(b *testing.B, fast bool) {
	// One agent stands for the fleet here: its own signing bucket is off.
	p := startPlaneConfig(b, controlplane.Config{DataDir: b.TempDir(), SVIDTTL: time.Hour, CATTL: 48 * time.Hour, FastSign: fast, AgentSignRate: -1})
	ctx := context.Background()
	e, err := p.srv.CreateEntry(ctx, controlplane.EntrySpec{SpiffeID: "spiffe://cluster.local/bench/batch",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:4242"}}}, "bench")
	if err != nil {
		b.Fatal(err)
	}
	tok, _, err := p.srv.CreateAgentToken(ctx, "batch", time.Hour, "bench")
	if err != nil {
		b.Fatal(err)
	}
	trust, _ := os.ReadFile(p.bundle)
	certs, _ := agent.ParseBundlePEM(trust)
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	dial := func(cert *tls.Certificate) agentv1.AgentServiceClient {
		cfg := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		cc, err := grpc.NewClient(p.agentAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cc.Close() })
		return agentv1.NewAgentServiceClient(cc)
	}
	nodeKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	nodeCSR, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, nodeKey)
	att, err := dial(nil).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(tok), Csr: nodeCSR})
	if err != nil {
		b.Fatal(err)
	}
	client := dial(&tls.Certificate{Certificate: att.GetSvidChain(), PrivateKey: nodeKey})
	const batch = 500
	req := &agentv1.SignX509SVIDsRequest{}
	for range batch {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
		req.Csrs = append(req.Csrs, &agentv1.CSRForEntry{EntryId: e.ID, Csr: csr})
	}
	b.ResetTimer()
	start := time.Now()
	n := 0
	for b.Loop() {
		resp, err := client.SignX509SVIDs(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		for _, s := range resp.GetSvids() {
			if s.GetCode() != 0 {
				b.Fatalf("item: %d %s", s.GetCode(), s.GetMessage())
			}
		}
		n += batch
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "svids/s")
}
