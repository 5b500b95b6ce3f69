package bench

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/sds"
)

// sdsConnectLoop runs cfg.Clients goroutines, each looping {new
// connection, StreamSecrets for "default", first secret, close} until the
// duration ends.
func sdsConnectLoop(ctx context.Context, cfg SDSConfig) (SDSResult, error) {
	if cfg.Clients <= 0 {
		return SDSResult{}, errors.New("clients must be positive")
	}
	res := SDSResult{Mode: "connect-loop", Names: []string{sds.NameDefault}}
	r := &sdsRun{cfg: cfg}
	r.cfg.Names = []string{sds.NameDefault}
	lctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()

	var (
		mu         sync.Mutex
		all        []time.Duration
		iters      atomic.Int64
		unfinished atomic.Int64
		wg         sync.WaitGroup
	)
	start := time.Now()
	// Open loop: a schedule of start times, taken by the clients.
	var schedule chan time.Time
	if cfg.ConnectRate > 0 {
		schedule = make(chan time.Time, 1<<16)
		wg.Go(func() {
			defer close(schedule)
			interval := time.Duration(float64(time.Second) / cfg.ConnectRate)
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				select {
				case <-lctx.Done():
					return
				case at := <-t.C:
					select {
					case schedule <- at:
					default: // the clients are that far behind: counted as missed
						unfinished.Add(1)
					}
				}
			}
		})
	}
	for c := range cfg.Clients {
		wg.Go(func() {
			node := envoyNode("meshid-bench-loop-" + strconv.Itoa(c))
			var mine []time.Duration
			defer func() {
				mu.Lock()
				all = append(all, mine...)
				mu.Unlock()
			}()
			for lctx.Err() == nil {
				var scheduled time.Time
				if schedule != nil {
					at, ok := <-schedule
					if !ok {
						return
					}
					scheduled = at
				}
				d, err := connectOnce(lctx, cfg.Socket, node)
				if err == nil && !scheduled.IsZero() {
					d = time.Since(scheduled)
				}
				if err != nil {
					// The run's deadline travels to the server as
					// grpc-timeout, which can end the call a moment before
					// our own context reports it: both mean "cut off".
					if lctx.Err() != nil || status.Code(err) == codes.DeadlineExceeded {
						unfinished.Add(1)
					} else {
						r.fail(err)
						select { // do not spin on a dead socket
						case <-lctx.Done():
						case <-time.After(10 * time.Millisecond):
						}
					}
					continue
				}
				mine = append(mine, d)
				iters.Add(1)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case <-done:
			waiting = false
		case <-tick.C:
			if cfg.Progress != nil {
				cfg.Progress(fmt.Sprintf("connect loop: %d first secrets  errors %d", iters.Load(), r.errs.Load()))
			}
		}
	}
	res.Elapsed = time.Since(start)
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.Ready = len(all)
	res.FirstSecret = summarize(all)
	res.Errors = r.errs.Load()
	if s, ok := r.firstErr.Load().(string); ok {
		res.FirstError = s
	}
	res.Loop = &LoopResult{Clients: cfg.Clients, Iterations: len(all), Unfinished: int(unfinished.Load()), PerSecond: float64(len(all)) / res.Elapsed.Seconds(), Latency: res.FirstSecret}
	return res, nil
}

// connectOnce is one connect-loop iteration; the clock runs from before
// the connection is made to the first response.
func connectOnce(ctx context.Context, socket string, node *corev3.Node) (time.Duration, error) {
	t0 := time.Now()
	conn, err := sdsDial(socket)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(sctx)
	if err != nil {
		return 0, err
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, ResourceNames: []string{sds.NameDefault}, TypeUrl: sds.SecretTypeURL}); err != nil {
		return 0, err
	}
	resp, err := st.Recv()
	if err != nil {
		return 0, err
	}
	d := time.Since(t0)
	if _, err := decodeSecret(resp, sds.NameDefault); err != nil {
		return 0, err
	}
	return d, nil
}
