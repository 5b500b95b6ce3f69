// Command load drives SPIRE's svid.v1 MintX509SVID as `meshid bench mint`
// drives meshid: N P-256 CSRs made before the clock, C clients with one
// gRPC connection each over the unix admin socket.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"flag"
	"fmt"
	"net/url"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	sock := flag.String("socket", "", "SPIRE server admin socket")
	c := flag.Int("c", 8, "clients")
	n := flag.Int("n", 20000, "requests")
	flag.Parse()
	uri, _ := url.Parse("spiffe://cluster.local/bench")
	t0 := time.Now()
	csrs := make([][]byte, *n)
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < *n; i += workers {
				k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				// SPIRE takes the SPIFFE ID from the CSR's URI SAN.
				b, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{uri}}, k)
				if err != nil {
					panic(err)
				}
				csrs[i] = b
			}
		})
	}
	wg.Wait()
	prep := time.Since(t0)
	conns := make([]*grpc.ClientConn, *c)
	for i := range conns {
		cc, err := grpc.NewClient("unix://"+*sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			panic(err)
		}
		defer cc.Close()
		conns[i] = cc
	}
	lat := make([]time.Duration, *n)
	var next, errs atomic.Int64
	var first atomic.Value
	ctx := context.Background()
	start := time.Now()
	for w := range *c {
		cl := svidv1.NewSVIDClient(conns[w])
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= *n {
					return
				}
				t := time.Now()
				_, err := cl.MintX509SVID(ctx, &svidv1.MintX509SVIDRequest{Csr: csrs[i]})
				lat[i] = time.Since(t)
				if err != nil {
					errs.Add(1)
					first.CompareAndSwap(nil, err.Error())
				}
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	slices.Sort(lat)
	pct := func(p int) time.Duration { return lat[min(len(lat)-1, len(lat)*p/100)] }
	fmt.Printf("minted     %d SVIDs in %s with %d clients (%d errors)\n", int64(*n)-errs.Load(), el.Round(time.Millisecond), *c, errs.Load())
	fmt.Printf("throughput %.0f SVIDs/s\n", float64(int64(*n)-errs.Load())/el.Seconds())
	fmt.Printf("latency    p50 %s  p99 %s  max %s\n", pct(50).Round(time.Microsecond), pct(99).Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond))
	fmt.Printf("csr prep   %s (before the clock)\n", prep.Round(time.Millisecond))
	if e, ok := first.Load().(string); ok {
		fmt.Printf("first error: %s\n", e)
		os.Exit(1)
	}
}
