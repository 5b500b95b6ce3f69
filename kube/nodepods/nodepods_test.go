package nodepods_test

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/nodepods"
)

// TestIndexFollowsPods: against a real API server, the index lists the
// service accounts with pods on each node, drops one when its last pod
// there is deleted or finishes, and tells which node changed.
func TestIndexFollowsPods(t *testing.T) {
	bed := k8stest.Shared(t)
	c := bed.Client
	ctx := context.Background()
	ns := bed.Namespace(t)
	nodeA, nodeB := bed.Node(t, "np-a"), bed.Node(t, "np-b")
	changed := make(chan string, 100)
	x := nodepods.New(c, slog.New(slog.DiscardHandler), func(n string) { changed <- n })
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { x.Run(runCtx) })
	defer func() { cancel(); wg.Wait() }()
	if err := x.WaitSynced(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	pod := func(name, sa, node string) *corev1.Pod {
		t.Helper()
		if _, err := c.CoreV1().ServiceAccounts(ns).Get(ctx, sa, metav1.GetOptions{}); err != nil {
			if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		p, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "x"}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// want waits for node's list to be sas (an informer event away).
	want := func(node string, sas ...string) uint64 {
		t.Helper()
		deadline := time.After(20 * time.Second)
		for {
			got, gen := x.ServiceAccounts(node)
			if slices.Equal(got, sas) {
				return gen
			}
			select {
			case <-changed:
			case <-deadline:
				t.Fatalf("node %s: %v, want %v", node, got, sas)
			}
		}
	}
	pod("web-0", "web", nodeA.Name)
	web1 := pod("web-1", "web", nodeA.Name)
	db := pod("db-0", "db", nodeA.Name)
	pod("web-2", "web", nodeB.Name)
	g1 := want(nodeA.Name, ns+"/db", ns+"/web")
	want(nodeB.Name, ns+"/web")

	zero := int64(0)
	// One of two web pods gone: web stays, and nothing changed for node a.
	if err := c.CoreV1().Pods(ns).Delete(ctx, web1.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	// The db pod finishes: it needs no identity.
	db.Status.Phase = corev1.PodSucceeded
	if _, err := c.CoreV1().Pods(ns).UpdateStatus(ctx, db, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	g2 := want(nodeA.Name, ns+"/web")
	if g2 == g1 {
		t.Fatalf("generation %d did not change with the list", g2)
	}
	if err := c.CoreV1().Pods(ns).Delete(ctx, "web-0", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	want(nodeA.Name)
	want(nodeB.Name, ns+"/web")
}
