package podattest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/peer"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/attest"
)

// BenchmarkAttestPodConnection is the workload attestation of one new
// connection from a process in a pod, from the informer's cache: the
// server handshake (peer credentials, pidfd, start time) and Set.Caller
// with the unix and k8s attestors (executable path and cached digest,
// the cgroup file, parsing it, the container-ID index, the selectors, the
// process re-check). The cache holds a full node: 110 pods (the kubelet's
// default max-pods) of 2 containers and an init container each, put in the
// informer's own indexer as its list would. The dial and accept are
// outside the timed part; p50 and p99 per connection are reported.
func BenchmarkAttestPodConnection(b *testing.B) {
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://127.0.0.1:1"}) // never started: the cache is filled below
	if err != nil {
		b.Fatal(err)
	}
	root := b.TempDir()
	a, err := New(Config{Client: client, NodeName: "node-1", ProcRoot: root})
	if err != nil {
		b.Fatal(err)
	}
	var target *corev1.Pod
	for i := range 110 {
		p := benchPod(i)
		if err := a.inf.GetIndexer().Add(p); err != nil {
			b.Fatal(err)
		}
		if i == 57 {
			target = p
		}
	}
	cid, _ := containerIDOfStatus(target.Status.ContainerStatuses[0].ContainerID)
	// This process stands in for the pod's: its cgroup file in the tree
	// names the container.
	d := filepath.Join(root, fmt.Sprint(os.Getpid()))
	if err := os.MkdirAll(d, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "cgroup"), []byte(containerdCgroup(string(target.UID), cid)), 0o644); err != nil {
		b.Fatal(err)
	}
	set, err := attest.NewSet(attest.Unix{}, a)
	if err != nil {
		b.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-pod-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	lis, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	creds := attest.UnixCredentials()
	var took []time.Duration
	for b.Loop() {
		c, err := net.Dial("unix", lis.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		raw, err := lis.Accept()
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		conn, info, err := creds.ServerHandshake(raw)
		if err != nil {
			b.Fatal(err)
		}
		caller, err := set.Caller(peer.NewContext(context.Background(), &peer.Peer{AuthInfo: info}))
		d := time.Since(start)
		if err != nil {
			b.Fatal(err)
		}
		if !slices.Contains(caller.Selectors, "k8s:pod-name:"+target.Name) {
			b.Fatalf("attested %q", caller.Selectors)
		}
		took = append(took, d)
		conn.Close()
		c.Close()
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(took[len(took)*99/100].Microseconds()), "p99-µs")
}

func benchPod(i int) *corev1.Pod {
	id := func(n int) string { return fmt.Sprintf("%064x", i*10+n+1) }
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns-%d", i%7), Name: fmt.Sprintf("web-%d", i),
			UID:    types.UID(fmt.Sprintf("00000000-0000-4000-8000-%012x", i)),
			Labels: map[string]string{"app": "web", "app.kubernetes.io/instance": fmt.Sprintf("web-%d", i), "pod-template-hash": "7d4b9c"}},
		Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "web",
			InitContainers: []corev1.Container{{Name: "init", Image: "example.org/init:1"}},
			Containers:     []corev1.Container{{Name: "app", Image: "example.org/app:1"}, {Name: "envoy", Image: "envoyproxy/envoy:v1.33"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning,
			ContainerStatuses: []corev1.ContainerStatus{
				{Name: "app", Image: "example.org/app:1", ImageID: "example.org/app@sha256:" + id(0), ContainerID: "containerd://" + id(1)},
				{Name: "envoy", Image: "docker.io/envoyproxy/envoy:v1.33", ContainerID: "containerd://" + id(2)},
			},
			InitContainerStatuses: []corev1.ContainerStatus{{Name: "init", Image: "example.org/init:1", ContainerID: "containerd://" + id(3)}},
		},
	}
}
