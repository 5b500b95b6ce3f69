package k8stest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Environment variables that connect tests to a bed.
const (
	// EnvDir names the directory of a running bed (its state.json).
	EnvDir = "MESHID_K8S_DIR"
	// EnvRequired, when "1", turns a missing bed from a skip into a
	// failure; `make test` (and so CI) sets it.
	EnvRequired = "MESHID_K8S_REQUIRED"
)

// Bed is a connection to the running test bed, shared by every test of a
// test binary.
type Bed struct {
	// Kubeconfig is the path of an admin (system:masters) kubeconfig.
	Kubeconfig string
	// Config is the admin REST configuration.
	Config *rest.Config
	// Client is an admin clientset.
	Client kubernetes.Interface
	// Kubectl is the path of the kubectl v1.37.2 binary.
	Kubectl string
	// State is the bed's state.json.
	State *State
}

var (
	sharedOnce sync.Once
	sharedBed  *Bed
	sharedErr  error
	sharedHTTP *http.Client
)

// tracked are the transports of clients tests made for themselves (another
// identity than the shared admin's), closed with the shared one's.
var (
	trackedMu sync.Mutex
	tracked   []http.RoundTripper
)

// Track closes rt's idle connections when t ends, and has CloseIdle (and
// so FindLeaks, again and again until nothing is left) close them too. The
// first is not enough alone: a connection that carried a watch as the test
// stopped its controller turns idle only once the cancellation has gone
// through, after t's cleanup ran, and its read loop was counted as a leak
// (kube/pcrsigner failed so in CI).
func Track(t testing.TB, rt http.RoundTripper) {
	// Unwrapped: client-go's round-trippers do not pass it on.
	t.Cleanup(func() { utilnet.CloseIdleConnectionsFor(rt) })
	trackedMu.Lock()
	defer trackedMu.Unlock()
	tracked = append(tracked, rt)
}

// CloseIdle closes the shared client's idle connections, and those of every
// Track'ed transport, whose reading goroutines would otherwise outlive the
// tests: a TestMain that checks for leaked goroutines calls it after m.Run.
func CloseIdle() {
	// Unwrapped: client-go's round-trippers do not pass it on.
	if sharedHTTP != nil {
		utilnet.CloseIdleConnectionsFor(sharedHTTP.Transport)
	}
	trackedMu.Lock()
	defer trackedMu.Unlock()
	for _, rt := range tracked {
		utilnet.CloseIdleConnectionsFor(rt)
	}
}

// Main runs a test binary that uses Shared and fails it, once its tests
// passed, if any goroutine is left (FindLeaks): every controller must stop
// what it started. Use it as
// `func TestMain(m *testing.M) { os.Exit(k8stest.Main(m)) }`.
func Main(m *testing.M) int {
	code := m.Run()
	if code == 0 {
		if err := FindLeaks(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	return code
}

// FindLeaks is goleak.Find for a test binary that used Shared: the shared
// client's idle connections are closed first, and again until goleak
// finds nothing or 5 s have passed. A connection that carried an
// informer's last request as the tests ended turns idle only once that
// request is answered; closed once, too early, its read loop was counted
// as a leak (kube/bundlecm failed so in CI).
func FindLeaks(opts ...goleak.Option) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		CloseIdle()
		err := goleak.Find(opts...)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond) // polling a condition with a deadline
	}
}

const howToStart = "start one with `make testbed-up && eval $(make -s testbed-env)`, or run `make test`, which starts one for the run"

// Shared returns the bed named by MESHID_K8S_DIR. Without one the test is
// skipped (loudly), or fails when MESHID_K8S_REQUIRED=1, as under `make
// test` and in CI. A bed that is named but does not answer always fails.
func Shared(t testing.TB) *Bed {
	t.Helper()
	dir := os.Getenv(EnvDir)
	if dir == "" {
		msg := fmt.Sprintf("NO KUBERNETES TEST BED: %s is not set; %s", EnvDir, howToStart)
		if os.Getenv(EnvRequired) == "1" {
			t.Fatalf("%s (%s=1: the Kubernetes tests must run)", msg, EnvRequired)
		}
		t.Skip("SKIPPED, " + msg)
	}
	sharedOnce.Do(func() { sharedBed, sharedErr = connect(dir) })
	if sharedErr != nil {
		t.Fatalf("Kubernetes test bed %s=%s: %v; %s", EnvDir, dir, sharedErr, howToStart)
	}
	return sharedBed
}

// connect loads dir/state.json and checks the API server answers /readyz.
func connect(dir string) (*Bed, error) {
	st, err := LoadState(dir)
	if err != nil {
		return nil, err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", st.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", st.Kubeconfig, err)
	}
	// Tests create objects in bursts; client-go's default 5 QPS would make
	// them wait on the client, not the server.
	cfg.QPS, cfg.Burst = 200, 400
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("http client: %w", err)
	}
	c, err := kubernetes.NewForConfigAndClient(cfg, hc)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	sharedHTTP = hc
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	body, err := c.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("API server %s does not answer /readyz: %w (%s)", st.APIServer, err, strings.TrimSpace(string(body)))
	}
	return &Bed{Kubeconfig: st.Kubeconfig, Config: cfg, Client: c, Kubectl: st.Kubectl, State: st}, nil
}

// Namespace creates a fresh namespace named after the test, with its
// ServiceAccount "default" (no controller manager creates it here). It is
// never deleted: without kube-controller-manager deletion never finishes,
// and the bed is thrown away after the run.
func (b *Bed) Namespace(t testing.TB) string {
	t.Helper()
	name := uniqueName(t.Name(), 63)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := b.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"meshid.test/test": labelValue(t.Name())}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	_, err = b.Client.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service account %s/default: %v", name, err)
	}
	return name
}

// Node creates a fresh Node object whose name starts with prefix and
// deletes it when the test ends. Nothing runs on it: it exists so pods can
// name it and bound tokens carry its name and UID.
func (b *Bed) Node(t testing.TB, prefix string) *corev1.Node {
	t.Helper()
	name := uniqueName(prefix, 63)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := b.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"meshid.test/test": labelValue(t.Name())}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := b.Client.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Logf("delete node %s: %v", name, err)
		}
	})
	return n
}

// uniqueName turns s into a DNS-1123 label of at most max characters that
// ends in a random suffix, so reruns and parallel tests never collide.
func uniqueName(s string, max int) string {
	var b strings.Builder
	dash := true // no leading dash, no runs of dashes
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
			dash = false
		} else if !dash {
			b.WriteByte('-')
			dash = true
		}
	}
	base := strings.TrimRight(b.String(), "-")
	if base == "" {
		base = "t"
	}
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	tail := "-" + hex.EncodeToString(suffix)
	if len(base) > max-len(tail) {
		base = strings.TrimRight(base[:max-len(tail)], "-")
	}
	return base + tail
}

// labelValue makes s a valid label value (63 characters of [A-Za-z0-9._-],
// alphanumeric at both ends), so objects can be traced back to their test.
func labelValue(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	if len(b) > 63 {
		b = b[:63]
	}
	return strings.Trim(string(b), "._-")
}
