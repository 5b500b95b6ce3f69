package bundlecm_test

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/bundlecm"
)

// waitData polls the API server (a condition with a deadline) until the
// ConfigMap holds want.
func waitData(t *testing.T, bed *k8stest.Bed, ns, want, what string) *corev1.ConfigMap {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		cm, err := bed.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), "meshid-bundle", metav1.GetOptions{})
		if err == nil && cm.Data[bundlecm.Key] == want {
			return cm
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the ConfigMap never held %q (last: %v, %v)", what, want, cm, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPublisher: against a real API server the ConfigMap is created with
// the bundle, follows a bundle change, and is put back after someone edits
// or deletes it.
func TestPublisher(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	var bundle atomic.Value
	bundle.Store("A")
	p := bundlecm.New(bed.Client, ns, "meshid-bundle", func() []byte { return []byte(bundle.Load().(string)) }, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { p.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	cm := waitData(t, bed, ns, "A", "first publication")
	if cm.Labels[bundlecm.ManagedByLabel] != "meshid" {
		t.Fatalf("labels %v", cm.Labels)
	}
	bundle.Store("B")
	p.Kick()
	cm = waitData(t, bed, ns, "B", "after a bundle change")

	cm.Data[bundlecm.Key] = "tampered"
	if _, err := bed.Client.CoreV1().ConfigMaps(ns).Update(context.Background(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitData(t, bed, ns, "B", "after an edit by someone else")
	if err := bed.Client.CoreV1().ConfigMaps(ns).Delete(context.Background(), "meshid-bundle", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitData(t, bed, ns, "B", "after a deletion")
	if err := p.Err(); err != nil {
		t.Fatalf("last reconcile: %v", err)
	}
}
