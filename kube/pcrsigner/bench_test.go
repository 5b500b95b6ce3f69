package pcrsigner_test

import (
	"context"
	"log/slog"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/meshid/meshid/internal/k8stest"
)

// benchBed is a signer at the server's client rate (200 QPS) and kubelets
// on nodes nodes, with a fast client for the kubelets' side.
type benchBed struct {
	bed      *k8stest.Bed
	name     string
	ns       string
	kubelets []*kubelet

	mu      sync.Mutex
	created map[string]time.Time
	done    map[string]time.Time
	failed  int
	all     chan struct{}
	want    int
}

func newBenchBed(b *testing.B, nodes, want int) *benchBed {
	bed := k8stest.Shared(b)
	p := startPlane(b)
	bb := &benchBed{bed: bed, name: signerName(b), ns: bed.Namespace(b), created: map[string]time.Time{},
		done: map[string]time.Time{}, all: make(chan struct{}), want: want}
	rc := rest.CopyConfig(bed.Config)
	rc.QPS, rc.Burst = 200, 400
	sc, err := kubernetes.NewForConfig(rc)
	if err != nil {
		b.Fatal(err)
	}
	cfg := signerConfig(bed, p, bb.name)
	cfg.Client = sc
	if os.Getenv("PCR_BENCH_LOG") != "" {
		cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	runSigner(b, cfg)
	fc := rest.CopyConfig(bed.Config)
	fc.QPS, fc.Burst = 2000, 4000
	fast, err := kubernetes.NewForConfig(fc)
	if err != nil {
		b.Fatal(err)
	}
	fastBed := *bed
	fastBed.Client = fast
	for i := range nodes {
		bb.kubelets = append(bb.kubelets, newKubelet(b, &fastBed, bb.ns, "pcr-bench", "sa-"+string(rune('a'+i)), "pod-"+string(rune('a'+i))))
	}
	// An informer, not a bare watch: a watch the server closes under
	// load would lose events (seen here), the informer resumes.
	f := informers.NewSharedInformerFactoryWithOptions(bed.Client, 0, informers.WithNamespace(bb.ns))
	seen := func(o any) {
		p, ok := o.(*certv1.PodCertificateRequest)
		if !ok || len(p.Status.Conditions) == 0 {
			return
		}
		at := time.Now()
		bb.mu.Lock()
		defer bb.mu.Unlock()
		if _, dup := bb.done[p.Name]; dup {
			return
		}
		if p.Status.Conditions[0].Type != certv1.PodCertificateRequestConditionTypeIssued {
			bb.failed++
		}
		// The event may come before create has noted the name: keep the
		// time, subtract later.
		bb.done[p.Name] = at
		if len(bb.done) == bb.want {
			close(bb.all)
		}
	}
	_, _ = f.Certificates().V1().PodCertificateRequests().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: seen, UpdateFunc: func(_, o any) { seen(o) },
	})
	ctx, cancel := context.WithCancel(context.Background())
	f.Start(ctx.Done())
	f.WaitForCacheSync(ctx.Done())
	b.Cleanup(func() { cancel(); f.Shutdown() })
	return bb
}

func (bb *benchBed) create(b *testing.B, i int) {
	t0 := time.Now()
	k := bb.kubelets[i%len(bb.kubelets)]
	pcr, err := k.request(context.Background(), bb.name, p256(b), 86400, nil)
	if err != nil {
		b.Error(err)
		return
	}
	bb.mu.Lock()
	bb.created[pcr.Name] = t0
	bb.mu.Unlock()
}

func (bb *benchBed) report(b *testing.B, start time.Time) {
	select {
	case <-bb.all:
	case <-time.After(40 * time.Second):
		l, err := bb.bed.Client.CertificatesV1().PodCertificateRequests(bb.ns).List(context.Background(), metav1.ListOptions{})
		n := 0
		for _, p := range l.Items {
			if len(p.Status.Conditions) > 0 {
				n++
			}
		}
		bb.mu.Lock()
		defer bb.mu.Unlock()
		b.Fatalf("only %d of %d seen issued by the watch; the API has %d of %d with a condition (%v)", len(bb.done), bb.want, n, len(l.Items), err)
	}
	total := time.Since(start)
	bb.mu.Lock()
	defer bb.mu.Unlock()
	if bb.failed > 0 {
		b.Fatalf("%d requests Denied/Failed", bb.failed)
	}
	lat := make([]time.Duration, 0, len(bb.done))
	for name, at := range bb.done {
		t0, ok := bb.created[name]
		if !ok {
			b.Fatalf("%s issued, never created", name)
		}
		lat = append(lat, at.Sub(t0))
	}
	slices.Sort(lat)
	q := func(f float64) float64 { return lat[min(len(lat)-1, int(f*float64(len(lat))))].Seconds() }
	b.ReportMetric(q(0.5), "p50_s")
	b.ReportMetric(q(0.99), "p99_s")
	b.ReportMetric(lat[len(lat)-1].Seconds(), "max_s")
	b.ReportMetric(total.Seconds(), "total_s")
	b.ReportMetric(float64(len(lat)), "issued")
}

// BenchmarkPCRSteady20: PodCertificateRequests created at a steady 20/s
// for 15 s over 4 nodes; created → Issued latency (goal p99 ≤ 2 s).
func BenchmarkPCRSteady20(b *testing.B) {
	const rate, secs = 20, 15
	for b.Loop() {
		bb := newBenchBed(b, 4, rate*secs)
		start := time.Now()
		tick := time.NewTicker(time.Second / rate)
		var wg sync.WaitGroup
		for i := range rate * secs {
			<-tick.C
			wg.Go(func() { bb.create(b, i) })
		}
		tick.Stop()
		wg.Wait()
		bb.report(b, start)
	}
}

// BenchmarkPCRBurst1000: a kubelet-restart storm, 1,000 requests created
// as fast as 32 clients can over 4 nodes; all Issued, none Failed; total
// time and latency.
func BenchmarkPCRBurst1000(b *testing.B) {
	const n, par = 1000, 32
	for b.Loop() {
		bb := newBenchBed(b, 4, n)
		start := time.Now()
		var wg sync.WaitGroup
		for w := range par {
			wg.Go(func() {
				for i := w; i < n; i += par {
					bb.create(b, i)
				}
			})
		}
		wg.Wait()
		b.ReportMetric(time.Since(start).Seconds(), "create_s")
		bb.report(b, start)
	}
}
