// Command agents simulates N SPIRE agents against a SPIRE server, as
// `meshid bench agents` does against meshid, to measure the server's RSS
// per connected agent: join tokens and W entries per agent are made first
// over the admin socket (the baseline is read after), then each agent
// attests with its token over TLS, fetches its authorized entries, signs W
// CSRs in one BatchNewX509SVID, and holds its mTLS connection, syncing
// every 5 s (GetAuthorizedEntries and GetBundle) as SPIRE's agent does.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	agentv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/agent/v1"
	bundlev1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/bundle/v1"
	entryv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/entry/v1"
	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

func rssKiB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		panic(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	panic("no VmRSS")
}

func main() {
	sock := flag.String("socket", "", "SPIRE server admin socket")
	addr := flag.String("addr", "127.0.0.1:18981", "SPIRE server agent address")
	pid := flag.Int("pid", 0, "SPIRE server pid (RSS)")
	n := flag.Int("agents", 1000, "agents")
	w := flag.Int("workloads", 10, "entries per agent")
	conc := flag.Int("c", 32, "agents starting at once")
	hold := flag.Duration("hold", 30*time.Second, "hold after all are up")
	flag.Parse()
	ctx := context.Background()
	ac, err := grpc.NewClient("unix://"+*sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	agents := agentv1.NewAgentClient(ac)
	entries := entryv1.NewEntryClient(ac)
	tokens := make([]string, *n)
	t0 := time.Now()
	for i := range tokens {
		jt, err := agents.CreateJoinToken(ctx, &agentv1.CreateJoinTokenRequest{Ttl: 3600})
		if err != nil {
			panic(err)
		}
		tokens[i] = jt.Value
	}
	var batch []*types.Entry
	flush := func() {
		if len(batch) == 0 {
			return
		}
		resp, err := entries.BatchCreateEntry(ctx, &entryv1.BatchCreateEntryRequest{Entries: batch})
		if err != nil {
			panic(err)
		}
		for _, r := range resp.Results {
			if r.Status.Code != 0 {
				panic(r.Status.Message)
			}
		}
		batch = nil
	}
	for i, tok := range tokens {
		for j := range *w {
			batch = append(batch, &types.Entry{
				ParentId:    &types.SPIFFEID{TrustDomain: "cluster.local", Path: "/spire/agent/join_token/" + tok},
				SpiffeId:    &types.SPIFFEID{TrustDomain: "cluster.local", Path: fmt.Sprintf("/ns/n%d/sa/w%d", i, j)},
				Selectors:   []*types.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(1000+j)}},
				X509SvidTtl: 86400,
			})
			if len(batch) == 50 {
				flush()
			}
		}
	}
	flush()
	fmt.Printf("setup: %d tokens, %d entries in %s\n", *n, *n**w, time.Since(t0).Round(time.Millisecond))
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		panic(err)
	}
	runtime.GC()
	// SPIRE's server reloads its authorized-entries cache every 5 s: an
	// entry is served to agents only after the next reload.
	time.Sleep(7 * time.Second)
	before := rssKiB(*pid)
	var up, errs, svids, done atomic.Int64
	allUp := make(chan struct{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	sem := make(chan struct{}, *conc)
	t1 := time.Now()
	for i := range *n {
		sem <- struct{}{}
		wg.Go(func() {
			fail := func(what string, err error) {
				errs.Add(1)
				fmt.Fprintf(os.Stderr, "agent %d: %s: %v\n", i, what, err)
				<-sem
				if done.Add(1) == int64(*n) {
					close(allUp)
				}
			}
			// Node attestation over TLS, trusting nothing (insecure bootstrap).
			bc, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})))
			if err != nil {
				fail("dial", err)
				return
			}
			st, err := agentv1.NewAgentClient(bc).AttestAgent(ctx)
			if err != nil {
				fail("attest", err)
				return
			}
			if err := st.Send(&agentv1.AttestAgentRequest{Step: &agentv1.AttestAgentRequest_Params_{Params: &agentv1.AttestAgentRequest_Params{
				Data:   &types.AttestationData{Type: "join_token", Payload: []byte(tokens[i])},
				Params: &agentv1.AgentX509SVIDParams{Csr: csr},
			}}}); err != nil {
				fail("attest send", err)
				return
			}
			resp, err := st.Recv()
			if err != nil {
				fail("attest recv", err)
				return
			}
			_ = st.CloseSend()
			bc.Close()
			chain := resp.GetResult().GetSvid().GetCertChain()
			cert := tls.Certificate{Certificate: chain, PrivateKey: key}
			// The agent's own connection: mTLS with its SVID, held.
			cc, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})))
			if err != nil {
				fail("dial mtls", err)
				return
			}
			defer cc.Close()
			ec, sc, bcl := entryv1.NewEntryClient(cc), svidv1.NewSVIDClient(cc), bundlev1.NewBundleClient(cc)
			ae, err := ec.GetAuthorizedEntries(ctx, &entryv1.GetAuthorizedEntriesRequest{})
			if err != nil {
				fail("authorized entries", err)
				return
			}
			var params []*svidv1.NewX509SVIDParams
			for _, e := range ae.Entries {
				params = append(params, &svidv1.NewX509SVIDParams{EntryId: e.Id, Csr: csr})
			}
			br, err := sc.BatchNewX509SVID(ctx, &svidv1.BatchNewX509SVIDRequest{Params: params})
			if err != nil {
				fail("batch sign", err)
				return
			}
			for _, r := range br.Results {
				if r.Svid != nil {
					svids.Add(1)
				}
			}
			if _, err := bcl.GetBundle(ctx, &bundlev1.GetBundleRequest{}); err != nil {
				fail("bundle", err)
				return
			}
			<-sem
			up.Add(1)
			if done.Add(1) == int64(*n) {
				close(allUp)
			}
			tick := time.NewTicker(5 * time.Second)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := ec.GetAuthorizedEntries(ctx, &entryv1.GetAuthorizedEntriesRequest{}); err != nil {
						errs.Add(1)
					}
					if _, err := bcl.GetBundle(ctx, &bundlev1.GetBundleRequest{}); err != nil {
						errs.Add(1)
					}
				}
			}
		})
	}
	select {
	case <-allUp:
	case <-time.After(10 * time.Minute):
		fmt.Println("timed out")
	}
	cold := time.Since(t1)
	time.Sleep(2 * time.Second)
	upRSS := rssKiB(*pid)
	time.Sleep(*hold)
	endRSS := rssKiB(*pid)
	close(stop)
	wg.Wait()
	fmt.Printf("agents %d up, %d SVIDs, %d errors, cold start %s\n", up.Load(), svids.Load(), errs.Load(), cold.Round(time.Millisecond))
	fmt.Printf("server RSS %d -> %d -> %d KiB (before / all up / after %s)\n", before, upRSS, endRSS, *hold)
	fmt.Printf("per agent: up %.1f KiB, end %.1f KiB\n", float64(upRSS-before)/float64(*n), float64(endRSS-before)/float64(*n))
}
