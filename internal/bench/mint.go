// Package bench holds meshid's load generators: they drive a running
// server through its real APIs, from another process, and report
// throughput and latency.
package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// MintConfig describes a CSR-minting load.
type MintConfig struct {
	AdminSocket string
	// AdminSockets, if set, spreads the clients over several replicas
	// (AdminSocket is then ignored): client i starts on socket i mod n and
	// moves to the next on Unavailable, so the load goes on while a
	// replica is killed; the serials are checked against every replica's
	// shared inventory.
	AdminSockets []string
	SpiffeID     string
	Concurrency  int // concurrent clients, each with its own connection
	Requests     int
	// KeygenInline makes each client generate its key and CSR per request,
	// on the clock. By default the CSRs are made before the clock starts so
	// the figure measures the server, not the load generator sharing its
	// CPUs.
	KeygenInline bool
	// VerifyInventory pages through the inventory afterwards and checks
	// that every serial received is recorded.
	VerifyInventory bool
	// Progress, if set, is called about once a second with requests done.
	Progress func(done int)
}

// MintResult is what a mint load measured.
type MintResult struct {
	Requests   int           `json:"requests"`
	Errors     int           `json:"errors"`
	FirstError string        `json:"first_error,omitempty"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	PerSecond  float64       `json:"svids_per_second"`
	P50        time.Duration `json:"p50_ns"`
	P99        time.Duration `json:"p99_ns"`
	Max        time.Duration `json:"max_ns"`
	CSRPrep    time.Duration `json:"csr_prep_ns"`
	// InventoryChecked is how many received serials were found in the
	// inventory (only with VerifyInventory).
	InventoryChecked int `json:"inventory_checked"`
	// Duplicates counts serials received more than once (two replicas
	// handing out one serial): always 0 unless something is wrong.
	Duplicates int `json:"duplicate_serials"`
	// Failovers counts clients moving to another replica.
	Failovers int `json:"failovers,omitempty"`
}

func dial(path string) (*grpc.ClientConn, error) {
	// gRPC reads a relative path in a unix:// target as an authority.
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
}

func makeCSR() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
}

// Mint runs the load and returns its figures.
func Mint(ctx context.Context, cfg MintConfig) (MintResult, error) {
	if cfg.Concurrency <= 0 || cfg.Requests <= 0 {
		return MintResult{}, errors.New("concurrency and requests must be positive")
	}
	var res MintResult
	var csrs [][]byte
	if !cfg.KeygenInline {
		start := time.Now()
		csrs = make([][]byte, cfg.Requests)
		var wg sync.WaitGroup
		var firstErr atomic.Value
		workers := runtime.GOMAXPROCS(0)
		for w := range workers {
			wg.Go(func() {
				for i := w; i < len(csrs); i += workers {
					c, err := makeCSR()
					if err != nil {
						firstErr.CompareAndSwap(nil, err)
						return
					}
					csrs[i] = c
				}
			})
		}
		wg.Wait()
		if e, ok := firstErr.Load().(error); ok {
			return res, fmt.Errorf("prepare CSRs: %w", e)
		}
		res.CSRPrep = time.Since(start)
	}

	sockets := cfg.AdminSockets
	if len(sockets) == 0 {
		sockets = []string{cfg.AdminSocket}
	}
	// conns[w][k]: client w's own connection to socket k (dialled lazily
	// by gRPC, so unused replicas cost nothing).
	conns := make([][]*grpc.ClientConn, cfg.Concurrency)
	for i := range conns {
		for _, sock := range sockets {
			c, err := dial(sock)
			if err != nil {
				return res, err
			}
			defer c.Close()
			conns[i] = append(conns[i], c)
		}
	}
	var failovers atomic.Int64

	var next atomic.Int64
	latencies := make([]time.Duration, cfg.Requests)
	serials := make([]string, cfg.Requests)
	var errCount atomic.Int64
	var firstErr atomic.Value
	var doneCount atomic.Int64

	progressDone := make(chan struct{})
	var progressWG sync.WaitGroup
	if cfg.Progress != nil {
		progressWG.Go(func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-progressDone:
					return
				case <-t.C:
					cfg.Progress(int(doneCount.Load()))
				}
			}
		})
	}

	start := time.Now()
	var wg sync.WaitGroup
	for w := range cfg.Concurrency {
		at := w % len(sockets)
		client := adminv1.NewAdminServiceClient(conns[w][at])
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= cfg.Requests {
					return
				}
				var csr []byte
				if csrs != nil {
					csr = csrs[i]
				} else {
					c, err := makeCSR()
					if err != nil {
						firstErr.CompareAndSwap(nil, err.Error())
						errCount.Add(1)
						continue
					}
					csr = c
				}
				t0 := time.Now()
				resp, err := client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: cfg.SpiffeID, Csr: csr})
				latencies[i] = time.Since(t0)
				doneCount.Add(1)
				if err != nil {
					errCount.Add(1)
					firstErr.CompareAndSwap(nil, status.Convert(err).Message())
					if len(sockets) > 1 && status.Code(err) == codes.Unavailable {
						at = (at + 1) % len(sockets)
						client = adminv1.NewAdminServiceClient(conns[w][at])
						failovers.Add(1)
					}
					continue
				}
				serials[i] = resp.GetSerial()
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	close(progressDone)
	progressWG.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}

	res.Requests = cfg.Requests
	res.Errors = int(errCount.Load())
	if s, ok := firstErr.Load().(string); ok {
		res.FirstError = s
	}
	res.PerSecond = float64(cfg.Requests-res.Errors) / res.Elapsed.Seconds()
	slices.Sort(latencies)
	res.P50 = latencies[len(latencies)/2]
	res.P99 = latencies[len(latencies)*99/100]
	res.Max = latencies[len(latencies)-1]

	res.Failovers = int(failovers.Load())
	seen := make(map[string]bool, len(serials))
	for _, sr := range serials {
		if sr != "" && seen[sr] {
			res.Duplicates++
		}
		seen[sr] = true
	}
	if cfg.VerifyInventory {
		// Any replica that answers has the whole (shared) inventory.
		var err error
		for k := range sockets {
			var n int
			if n, err = checkInventory(ctx, adminv1.NewAdminServiceClient(conns[0][k]), serials); err == nil || !errors.Is(err, errInventoryUnreadable) {
				res.InventoryChecked = n
				break
			}
		}
		if err != nil {
			return res, err
		}
	}
	if res.Duplicates > 0 {
		return res, fmt.Errorf("%d serials were handed out more than once", res.Duplicates)
	}
	return res, nil
}

// errInventoryUnreadable is a replica that could not list the inventory
// (killed): another is asked.
var errInventoryUnreadable = errors.New("inventory unreadable")

// checkInventory confirms that every serial the clients received is in the
// server's inventory: a certificate handed out but not recorded is a bug.
func checkInventory(ctx context.Context, c adminv1.AdminServiceClient, serials []string) (int, error) {
	want := make(map[string]bool, len(serials))
	for _, s := range serials {
		if s != "" {
			want[s] = true
		}
	}
	req := &adminv1.ListCertsRequest{IncludeExpired: true}
	found := 0
	for {
		resp, err := c.ListCerts(ctx, req)
		if err != nil {
			return 0, fmt.Errorf("read inventory: %w: %w", errInventoryUnreadable, err)
		}
		for _, r := range resp.GetCerts() {
			if want[r.GetSerial()] {
				found++
				delete(want, r.GetSerial())
			}
		}
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	if len(want) > 0 {
		return found, fmt.Errorf("%d issued serials are missing from the inventory", len(want))
	}
	return found, nil
}
