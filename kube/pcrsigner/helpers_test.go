package pcrsigner_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/pcrsigner"
)

// plane is a running meshid server.
type plane struct {
	srv *controlplane.Server
}

func startPlane(t testing.TB) *plane {
	t.Helper()
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: t.TempDir(), SVIDTTL: 24 * time.Hour, CATTL: 30 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-pcr-test-")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, controlplane.Endpoints{AdminSocket: filepath.Join(sockDir, "admin.sock")}, func(controlplane.Listening) { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		_ = srv.Close()
		_ = os.RemoveAll(sockDir)
	})
	return &plane{srv: srv}
}

// signerName is unique per test: every test's signer sees only its own
// requests on the shared API server.
func signerName(t testing.TB) string {
	return "meshid.test/" + strings.ToLower(fmt.Sprintf("t%d", time.Now().UnixNano()))
}

// running is a Signer run by a test.
type running struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (r *running) stop() { r.cancel(); r.wg.Wait() }

func runSigner(t testing.TB, cfg pcrsigner.Config) *running {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s, err := pcrsigner.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel}
	r.wg.Go(func() { s.Run(ctx) })
	t.Cleanup(r.stop)
	return r
}

func signerConfig(bed *k8stest.Bed, p *plane, name string) pcrsigner.Config {
	return pcrsigner.Config{Client: bed.Client, SignerName: name, Sign: p.srv.SignPodCertificate, Registerer: prometheus.NewRegistry()}
}

// kubelet plays the kubelet's part for one pod on one node.
type kubelet struct {
	bed  *k8stest.Bed
	ns   string
	node *corev1.Node
	sa   *corev1.ServiceAccount
	pod  *corev1.Pod
}

func newKubelet(t testing.TB, bed *k8stest.Bed, ns, nodePrefix, sa, pod string) *kubelet {
	t.Helper()
	ctx := context.Background()
	k := &kubelet{bed: bed, ns: ns, node: bed.Node(t, nodePrefix)}
	var err error
	k.sa, err = bed.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	k.pod, err = bed.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: pod},
		Spec: corev1.PodSpec{NodeName: k.node.Name, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app:1"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// request creates a PodCertificateRequest as the kubelet does: a stub
// PKCS#10 request signed by key, the pod's, service account's and node's
// names and UIDs.
func (k *kubelet) request(ctx context.Context, signer string, key crypto.Signer, maxSeconds int32, ann map[string]string) (*certv1.PodCertificateRequest, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	return k.bed.Client.CertificatesV1().PodCertificateRequests(k.ns).Create(ctx, &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "req-"},
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: signer,
			PodName:    k.pod.Name, PodUID: k.pod.UID,
			ServiceAccountName: k.sa.Name, ServiceAccountUID: k.sa.UID,
			NodeName: types.NodeName(k.pod.Spec.NodeName), NodeUID: k.node.UID,
			MaxExpirationSeconds:      &maxSeconds,
			StubPKCS10Request:         csr,
			UnverifiedUserAnnotations: ann,
		},
	}, metav1.CreateOptions{})
}

// condition is the request's condition, or nil.
func condition(p *certv1.PodCertificateRequest) *metav1.Condition {
	if len(p.Status.Conditions) == 0 {
		return nil
	}
	return &p.Status.Conditions[0]
}

// waitTerminal polls the API server (a condition with a deadline) until
// the request has its condition.
func waitTerminal(t testing.TB, bed *k8stest.Bed, ns, name string, within time.Duration) *certv1.PodCertificateRequest {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		p, err := bed.Client.CertificatesV1().PodCertificateRequests(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil && condition(p) != nil {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s/%s has no condition after %s (last: %v)", ns, name, within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func parseChain(t testing.TB, s string) [][]byte {
	t.Helper()
	var ders [][]byte
	rest := []byte(s)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			t.Fatalf("PEM block %q in the chain", b.Type)
		}
		ders = append(ders, b.Bytes)
	}
	if len(strings.TrimSpace(string(rest))) != 0 || len(ders) == 0 {
		t.Fatalf("bad chain PEM %q", s)
	}
	return ders
}
