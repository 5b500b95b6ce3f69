package controlplane

import (
	"context"
	"fmt"
	"math/big"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/etcdstore"
)

// Benchmarks of issue 13 on a real 3-member etcd (fsync on, loopback, a
// data dir per member). They need MESHID_ETCD_BIN and are skipped without
// it; being benchmarks, `go test` never runs them. See BENCHMARKS.md,
// "Replicas on etcd (issue 13)".

// etcdReplica opens a store on c under prefix and a server on it, sharing
// the KEK file, as `meshid server --store etcd` does.
func etcdReplica(b *testing.B, c *etcdtest.Cluster, prefix, name, kekFile string, opts ...func(*Config)) *Server {
	b.Helper()
	ctx := context.Background()
	st, err := etcdstore.Open(ctx, etcdstore.Options{Endpoints: c.Endpoints(), Prefix: prefix, Replica: name})
	if err != nil {
		b.Fatal(err)
	}
	cfg := Config{Store: st, SharedKEK: true, KEKFile: kekFile, DataDir: b.TempDir(), DisableAutoRotate: true}
	for _, o := range opts {
		o(&cfg)
	}
	srv, err := Open(ctx, cfg)
	if err != nil {
		_ = st.Close()
		b.Fatal(err)
	}
	return srv
}

func benchKEK(b *testing.B) string {
	b.Helper()
	p := filepath.Join(b.TempDir(), "kek")
	if _, err := kek.Create(p); err != nil {
		b.Fatal(err)
	}
	return p
}

// twoEtcdReplicas starts a 3-member cluster and two servers on it, a
// (which leads: it starts first) and b, closed when b ends; opts apply to
// b's Config.
func twoEtcdReplicas(b *testing.B, opts ...func(*Config)) (*Server, *Server) {
	b.Helper()
	c := etcdtest.Start(b, 3)
	kf := benchKEK(b)
	a := etcdReplica(b, c, "/bench/", "a", kf)
	b.Cleanup(func() { a.Close() })
	r := etcdReplica(b, c, "/bench/", "b", kf, opts...)
	b.Cleanup(func() { r.Close() })
	return a, r
}

// reportReturnAndCall reports the quantiles of the times measured from a
// call's return and from its start.
func reportReturnAndCall(b *testing.B, fromReturn, fromCall []time.Duration) {
	slices.Sort(fromReturn)
	slices.Sort(fromCall)
	b.ReportMetric(pct(fromReturn, 0.5), "p50-ms")
	b.ReportMetric(pct(fromReturn, 0.99), "p99-ms")
	b.ReportMetric(pct(fromReturn, 1), "max-ms")
	b.ReportMetric(pct(fromCall, 0.5), "call-p50-ms")
	b.ReportMetric(pct(fromCall, 0.99), "call-p99-ms")
}

// pct is the q-quantile of sorted d, in milliseconds.
func pct(d []time.Duration, q float64) float64 {
	return float64(d[int(float64(len(d)-1)*q)]) / float64(time.Millisecond)
}

// BenchmarkEtcdPropagation: an entry created through replica A, until it is
// in replica B's entry index (what B's Workload API, SDS and agent streams
// serve from), over one 3-member cluster. Run with -benchtime 300x.
func BenchmarkEtcdPropagation(b *testing.B) {
	a, r := twoEtcdReplicas(b)
	ctx := context.Background()
	var fromReturn, fromCall []time.Duration
	i := 0
	for b.Loop() {
		i++
		t0 := time.Now()
		e, err := a.CreateEntry(ctx, EntrySpec{SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/bench/sa/p%d", i),
			Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 200000+i)}}}, "bench")
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		// Poll B's index: a 50 µs step is far below what is measured and
		// costs little CPU.
		deadline := t1.Add(10 * time.Second)
		for {
			if _, ok := r.entries.get(e.ID); ok {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("entry %s not at replica b after 10 s", e.ID)
			}
			time.Sleep(50 * time.Microsecond) // polling the measured condition: adds at most 50 µs to each figure
		}
		t2 := time.Now()
		fromReturn = append(fromReturn, t2.Sub(t1))
		fromCall = append(fromCall, t2.Sub(t0))
	}
	reportReturnAndCall(b, fromReturn, fromCall)
}

// BenchmarkEtcdStartup100k: a replica (etcdstore.Open + Open) starting
// against a prefix holding 100,000 entries and 100,000 live inventory rows,
// filled by Import of a snapshot built in memory around the CA and JWT
// keys a first server made.
func BenchmarkEtcdStartup100k(b *testing.B) {
	const n = 100_000
	c := etcdtest.Start(b, 3)
	kf := benchKEK(b)
	ctx := context.Background()
	seed := etcdReplica(b, c, "/seed/", "seed", kf)
	snap, err := seed.Store().(store.Migrator).Export(ctx)
	caID := seed.activeID
	seed.Close()
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	for i := range n {
		e := store.Entry{ID: fmt.Sprintf("e-%07d", i), SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/n%d/sa/s%d", i%100, i),
			Selectors: []store.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 100000+i)}}, CreatedAt: now}
		snap.Entries = append(snap.Entries, e)
		snap.SVIDs = append(snap.SVIDs, store.IssuedSVID{Serial: fmt.Sprintf("%032x", i+1), SpiffeID: e.SpiffeID, NotBefore: now,
			NotAfter: now.Add(24 * time.Hour), EntryID: e.ID, CAID: caID, IssuedAt: now})
	}
	imp, err := etcdstore.Open(ctx, etcdstore.Options{Endpoints: c.Endpoints(), Prefix: "/bench/", Replica: "import"})
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	err = imp.Import(ctx, snap)
	_ = imp.Close()
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("imported %d entries and %d inventory rows in %s", len(snap.Entries), len(snap.SVIDs), time.Since(t0).Round(time.Millisecond))

	var worst time.Duration
	for b.Loop() {
		t := time.Now()
		srv := etcdReplica(b, c, "/bench/", "r", kf)
		d := time.Since(t)
		if got := srv.entries.len(); got != n {
			b.Fatalf("%d entries loaded, want %d", got, n)
		}
		b.StopTimer()
		b.Logf("start-up %s", d.Round(time.Millisecond))
		worst = max(worst, d)
		srv.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(worst)/float64(time.Second), "max-s")
}

// BenchmarkEtcdRevokeThroughFollower: a serial revoked through follower B,
// until B's served CRLs list it. B does not sign them: the leader A signs
// and stores the set when its watch sees the revocation, and B serves the
// stored bytes when its watch sees them (crlset.go). Each iteration mints
// through B first (not timed). It fails if B ever served CRLs the leader
// did not sign.
func BenchmarkEtcdRevokeThroughFollower(b *testing.B) {
	// B's bundle changes when its CRLs do: the benchmark waits on that.
	changed := make(chan struct{}, 1)
	a, r := twoEtcdReplicas(b, func(c *Config) {
		c.OnBundleChange = func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	})
	ctx := context.Background()
	e, err := a.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/bench/sa/revoked",
		Selectors: []store.Selector{{Type: "unix", Value: "uid:300000"}}}, "bench")
	if err != nil {
		b.Fatal(err)
	}
	if err := r.synced(ctx); err != nil {
		b.Fatal(err)
	}
	lists := func(serial string) bool {
		r.pubMu.Lock()
		defer r.pubMu.Unlock()
		return strings.Contains(r.crl.served.Covers, ","+serial)
	}
	var fromReturn, fromCall []time.Duration
	for range b.N {
		svid, err := r.MintX509SVID(ctx, MintRequest{SpiffeID: e.SpiffeID, KeyType: "ec-p256", EntryID: e.ID, Requester: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		n, _ := new(big.Int).SetString(svid.Serial, 16)
		serial := n.Text(16)
		t0 := time.Now()
		if _, err := r.Revoke(ctx, "", svid.Serial, "bench"); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		deadline := time.After(10 * time.Second)
		for !lists(serial) {
			select {
			case <-changed:
			case <-deadline:
				b.Fatalf("serial %s not on replica b's CRLs after 10 s", serial)
			}
		}
		t2 := time.Now()
		fromReturn = append(fromReturn, t2.Sub(t1))
		fromCall = append(fromCall, t2.Sub(t0))
	}
	b.StopTimer()
	if err := a.synced(ctx); err != nil {
		b.Fatal(err)
	}
	if sa, sb := servedSet(a), servedSet(r); sa.Number != sb.Number {
		b.Fatalf("A serves CRL set %d, B %d: B signed its own", sa.Number, sb.Number)
	}
	reportReturnAndCall(b, fromReturn, fromCall)
}
