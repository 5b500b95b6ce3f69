package trustpublish_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/trustpublish"
)

// cmName is a ConfigMap name no other test uses (every test's publisher
// covers every namespace of the shared bed).
func cmName(t testing.TB) string { return "ca-root-" + strings.TrimPrefix(randomTD(t), "td-")[:8] }

func waitCM(t testing.TB, c kubernetes.Interface, ns, name, want, what string) {
	t.Helper()
	eventually(t, 20*time.Second, what, func() (bool, string) {
		cm, err := c.CoreV1().ConfigMaps(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return cm.Data[trustpublish.ConfigMapKey] == want, fmt.Sprintf("%.40q", cm.Data[trustpublish.ConfigMapKey])
	})
}

// TestConfigMaps: against a real API server every namespace gets the
// ConfigMap with the bundle, one created later too; an excluded namespace
// gets none; a bundle change reaches all; an edit or deletion is undone.
func TestConfigMaps(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx := context.Background()
	name := cmName(t)
	ns1, excluded := bed.Namespace(t), bed.Namespace(t)
	a, bCA := newCA(t, "a"), newCA(t, "b")
	// A ConfigMap meshid made before the namespace was excluded.
	stale := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{trustpublish.ManagedByLabel: trustpublish.ManagedBy}},
		Data: map[string]string{trustpublish.ConfigMapKey: "old"}}
	if _, err := bed.Client.CoreV1().ConfigMaps(excluded).Create(ctx, stale, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var b bundleVar
	b.set(a)
	p := trustpublish.NewConfigMaps(trustpublish.ConfigMapsConfig{Client: bed.Client, Name: name, Exclude: []string{excluded},
		Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	run(t, p)
	waitCM(t, bed.Client, ns1, name, a, "existing namespace")
	waitCM(t, bed.Client, "default", name, a, "namespace default")
	ns2 := bed.Namespace(t)
	waitCM(t, bed.Client, ns2, name, a, "namespace created later")

	b.set(a, bCA)
	p.Kick()
	for _, ns := range []string{ns1, ns2, "default"} {
		waitCM(t, bed.Client, ns, name, a+bCA, "after a bundle change")
	}
	cm, err := bed.Client.CoreV1().ConfigMaps(ns1).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Labels[trustpublish.ManagedByLabel] != trustpublish.ManagedBy {
		t.Fatalf("labels %v", cm.Labels)
	}
	cm.Data[trustpublish.ConfigMapKey] = "tampered"
	if _, err := bed.Client.CoreV1().ConfigMaps(ns1).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCM(t, bed.Client, ns1, name, a+bCA, "after an edit")
	if err := bed.Client.CoreV1().ConfigMaps(ns2).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCM(t, bed.Client, ns2, name, a+bCA, "after a deletion")

	eventually(t, 10*time.Second, "excluded namespace reconciled", func() (bool, string) {
		ok, err := p.Reconciled(excluded)
		return ok && err == nil, fmt.Sprint(ok, err)
	})
	if _, err := bed.Client.CoreV1().ConfigMaps(excluded).Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("excluded namespace: %v, want NotFound", err)
	}
	if err := p.Err(); err != nil {
		t.Fatalf("last reconcile: %v", err)
	}
}

// TestConfigMapsSkipsTerminating: a namespace being deleted gets no
// ConfigMap and no retry loop (the API server would refuse it).
func TestConfigMapsSkipsTerminating(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx := context.Background()
	name := cmName(t)
	ns := bed.Namespace(t)
	// A finalizer-free namespace without a controller manager stays
	// Terminating once deleted: deletion never finishes here.
	if err := bed.Client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "namespace terminating", func() (bool, string) {
		n, err := bed.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		return err == nil && n.Status.Phase == corev1.NamespaceTerminating, fmt.Sprint(err)
	})
	live := bed.Namespace(t)
	var b bundleVar
	b.set(newCA(t, "a"))
	p := trustpublish.NewConfigMaps(trustpublish.ConfigMapsConfig{Client: bed.Client, Name: name, Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	run(t, p)
	waitCM(t, bed.Client, live, name, string(b.get()), "live namespace")
	eventually(t, 10*time.Second, "terminating namespace reconciled", func() (bool, string) {
		ok, err := p.Reconciled(ns)
		return ok && err == nil, fmt.Sprint(ok, err)
	})
	if _, err := bed.Client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("terminating namespace: %v, want NotFound", err)
	}
}
