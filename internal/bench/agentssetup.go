package bench

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"

	"google.golang.org/protobuf/types/known/durationpb"
)

// setup makes a join token per agent and the entries, concurrently.
func (r *agentsRun) setup(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent, progress func(string)) error {
	type job func(context.Context) error
	var jobs []job
	var mu sync.Mutex
	for _, a := range agents {
		jobs = append(jobs, func(ctx context.Context) error {
			t, err := admin.CreateJoinToken(ctx, &adminv1.CreateJoinTokenRequest{Agent: true, NodeId: a.node, Ttl: durationpb.New(time.Hour)})
			if err != nil {
				return fmt.Errorf("CreateJoinToken for node %s: %w", a.node, err)
			}
			if t.GetSpiffeId() != a.id.String() {
				return fmt.Errorf("token for node %s grants %s, not %s", a.node, t.GetSpiffeId(), a.id)
			}
			a.token = t.GetToken()
			return nil
		})
	}
	create := func(agent int, j int) job {
		return func(ctx context.Context) error {
			e := &adminv1.Entry{
				// uids far above any real one: the server's own workload
				// socket must not serve a shared bench entry to a local
				// process.
				Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:" + strconv.Itoa(3_000_000_000+j)}},
			}
			if agent >= 0 {
				a := agents[agent]
				e.SpiffeId = fmt.Sprintf("spiffe://%s/ns/bench/sa/%s-w%d", r.td.Name(), a.node, j)
				e.ParentId = a.id.String()
			} else {
				e.SpiffeId = fmt.Sprintf("spiffe://%s/ns/bench/sa/%s-shared-w%d", r.td.Name(), r.cfg.NodePrefix, j)
			}
			resp, err := admin.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: e})
			if err != nil {
				return fmt.Errorf("CreateEntry %s: %w", e.SpiffeId, err)
			}
			be := benchEntry{id: resp.GetEntry().GetId(), spiffeID: resp.GetEntry().GetSpiffeId(), agent: agent}
			mu.Lock()
			defer mu.Unlock()
			r.entryByID[be.id] = be
			if agent >= 0 {
				agents[agent].expected[be.id] = true
			} else {
				r.shared = append(r.shared, be)
			}
			return nil
		}
	}
	if r.cfg.Shared {
		for j := range r.cfg.Workloads {
			jobs = append(jobs, create(-1, j))
		}
	} else {
		for i := range agents {
			for j := range r.cfg.Workloads {
				jobs = append(jobs, create(i, j))
			}
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next, done atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range r.cfg.SetupConcurrency {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(jobs) {
					return
				}
				if err := jobs[i](ctx); err != nil {
					firstErr.CompareAndSwap(nil, err)
					cancel()
					return
				}
				done.Add(1)
			}
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case <-finished:
			waiting = false
		case <-tick.C:
			progress(fmt.Sprintf("set-up: %d/%d tokens and entries", done.Load(), len(jobs)))
		}
	}
	if err, ok := firstErr.Load().(error); ok {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if r.cfg.Shared {
		for _, a := range agents {
			for _, e := range r.shared {
				a.expected[e.id] = true
			}
		}
	}
	return nil
}

func newKey() (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// makeKeys gives a its node key and one workload key per entry.
func (a *simAgent) makeKeys(workloads int) error {
	var err error
	if a.nodeKey, a.nodeCSR, err = newKey(); err != nil {
		return fmt.Errorf("node key: %w", err)
	}
	a.keys, a.csrs = make([]crypto.Signer, workloads), make([][]byte, workloads)
	for j := range workloads {
		if a.keys[j], a.csrs[j], err = newKey(); err != nil {
			return fmt.Errorf("workload key: %w", err)
		}
	}
	return nil
}

// prepareKeys makes every agent's keys before the clock, on every CPU.
func prepareKeys(agents []*simAgent, workloads int) error {
	var wg sync.WaitGroup
	var firstErr atomic.Value
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(agents); i += workers {
				if err := agents[i].makeKeys(workloads); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return fmt.Errorf("prepare keys: %w", err)
	}
	return nil
}
