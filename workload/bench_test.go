package workload_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store"
)

// benchServer runs a real server (controlplane.Run, the production wiring)
// whose workload socket gives this process's uid one identity.
func benchServer(b *testing.B) (*controlplane.Server, string) {
	b.Helper()
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: b.TempDir(), SVIDTTL: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-wlb-")
	if err != nil {
		b.Fatal(err)
	}
	socket := filepath.Join(dir, "w.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, controlplane.Endpoints{AdminSocket: filepath.Join(dir, "a.sock"), Socket: socket}, func(controlplane.Listening) { close(ready) })
	}()
	<-ready
	b.Cleanup(func() { cancel(); <-done; srv.Close(); os.RemoveAll(dir) })
	if _, err := srv.CreateEntry(context.Background(), controlplane.EntrySpec{
		SpiffeID:  idA,
		Selectors: []store.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(os.Getuid())}},
	}, "bench"); err != nil {
		b.Fatal(err)
	}
	return srv, "unix://" + socket
}

func percentile(d []time.Duration, p int) time.Duration {
	slices.Sort(d)
	return d[(len(d)-1)*p/100]
}

// BenchmarkFirstSVID: a go-spiffe client connects and receives its first
// X.509-SVID from a warm server (the SVID is already issued and cached).
func BenchmarkFirstSVID(b *testing.B) {
	_, addr := benchServer(b)
	ctx := context.Background()
	if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(addr)); err != nil { // warm
		b.Fatal(err)
	}
	var lat []time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(addr)); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.ReportMetric(float64(percentile(lat, 50).Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(percentile(lat, 99).Microseconds())/1000, "ms-p99")
}

// BenchmarkRenewalPush1000Watchers: 1,000 go-spiffe X.509 watchers hold
// the same identity; its SVID is replaced (revoking the serial makes the
// server re-issue at once) and the time until each watcher has the new
// one is recorded.
func BenchmarkRenewalPush1000Watchers(b *testing.B) {
	const watchers = 1000
	srv, addr := benchServer(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	serials := make([]string, watchers)
	got := make(chan int, watchers*4)
	var wg sync.WaitGroup
	for i := range watchers {
		c, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		w := watcherFunc(func(x *workloadapi.X509Context) {
			mu.Lock()
			serials[i] = x.DefaultSVID().Certificates[0].SerialNumber.Text(16)
			mu.Unlock()
			got <- i
		})
		wg.Go(func() { _ = c.WatchX509Context(ctx, w) })
	}
	current := func() string {
		mu.Lock()
		defer mu.Unlock()
		return serials[0]
	}
	for range watchers { // everyone has the first SVID
		<-got
	}
	var all []time.Duration
	for b.Loop() {
		old := current()
		start := time.Now()
		if _, err := srv.Revoke(ctx, "", old, "bench"); err != nil {
			b.Fatal(err)
		}
		pending := watchers
		seen := make([]bool, watchers)
		for pending > 0 {
			i := <-got
			mu.Lock()
			s := serials[i]
			mu.Unlock()
			if s != old && !seen[i] {
				seen[i] = true
				pending--
				all = append(all, time.Since(start))
			}
		}
	}
	cancel()
	wg.Wait()
	b.ReportMetric(float64(percentile(all, 50).Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(percentile(all, 99).Microseconds())/1000, "ms-p99")
}

type watcherFunc func(*workloadapi.X509Context)

func (f watcherFunc) OnX509ContextUpdate(x *workloadapi.X509Context) { f(x) }
func (watcherFunc) OnX509ContextWatchError(error)                    {}
