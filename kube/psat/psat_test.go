package psat_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/psat"
)

func wantRefused(t *testing.T, what string, err error, says string) {
	t.Helper()
	if !errors.Is(err, attest.ErrNodeRefused) || !strings.Contains(err.Error(), says) {
		t.Fatalf("%s: %v; want a refusal saying %q", what, err, says)
	}
}

// TestVerifyAgainstAPIServer: against a real kube-apiserver, a token
// projected into a trusted agent pod proves its node; every other token is
// refused with the reason.
func TestVerifyAgainstAPIServer(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := bed.Client
	ns := bed.Namespace(t)
	node := bed.Node(t, "psat")
	pod := bed.PodOn(t, ns, "agent-0", "meshid-agent", node.Name)
	v, err := psat.New(psat.Config{Client: c, Cluster: "c1", ServiceAccounts: []string{ns + "/meshid-agent"}})
	if err != nil {
		t.Fatal(err)
	}

	good := bed.PodToken(t, ns, "meshid-agent", "meshid", pod)
	claim, err := v.Attest(ctx, []byte(good+"\n"))
	if err != nil {
		t.Fatalf("good token: %v", err)
	}
	if !slices.Equal(claim.Path, []string{"c1", string(node.UID)}) || claim.Node != node.Name {
		t.Fatalf("claim %+v, want path [c1 %s] on %s", claim, node.UID, node.Name)
	}
	want := []string{"k8s_psat:agent-ns:" + ns, "k8s_psat:agent-sa:meshid-agent", "k8s_psat:cluster:c1",
		"k8s_psat:node-name:" + node.Name, "k8s_psat:node-uid:" + string(node.UID)}
	if !slices.Equal(claim.Selectors, want) {
		t.Fatalf("selectors %v, want %v", claim.Selectors, want)
	}

	_, err = v.Attest(ctx, []byte(bed.PodToken(t, ns, "meshid-agent", "kubernetes", pod)))
	wantRefused(t, "another audience", err, "audience")
	_, err = v.Attest(ctx, []byte(bed.PodToken(t, ns, "meshid-agent", "meshid", nil)))
	wantRefused(t, "a token bound to no pod", err, "bound to no pod")
	other := bed.PodOn(t, ns, "intruder-0", "intruder", node.Name)
	_, err = v.Attest(ctx, []byte(bed.PodToken(t, ns, "intruder", "meshid", other)))
	wantRefused(t, "an untrusted service account", err, "not trusted")
	_, err = v.Attest(ctx, []byte("not.a.token"))
	wantRefused(t, "garbage", err, "does not accept")
	_, err = v.Attest(ctx, []byte(strings.Repeat("a", psat.MaxTokenSize+1)))
	wantRefused(t, "an oversized token", err, "no service-account token")

	// The pod deleted: its token proves nothing any more.
	zero := int64(0)
	if err := c.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	_, err = v.Attest(ctx, []byte(good))
	wantRefused(t, "the token of a deleted pod", err, "")
}

// TestNodeRecreated: a node deleted and re-created under the same name is
// another node; a token minted on the old one is refused.
func TestNodeRecreated(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := bed.Client
	ns := bed.Namespace(t)
	node := bed.Node(t, "recreated")
	pod := bed.PodOn(t, ns, "agent-0", "meshid-agent", node.Name)
	tok := bed.PodToken(t, ns, "meshid-agent", "meshid", pod)
	if err := c.CoreV1().Nodes().Delete(ctx, node.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node.Name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	v, err := psat.New(psat.Config{Client: c, Cluster: "c1", ServiceAccounts: []string{ns + "/meshid-agent"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Attest(ctx, []byte(tok))
	wantRefused(t, "a token of a node since re-created", err, "")
}

func TestConfigChecks(t *testing.T) {
	for _, sa := range []string{"", "noslash", "a/", "/b", "a/b/c"} {
		if _, err := psat.New(psat.Config{Client: fakeClient(), Cluster: "c", ServiceAccounts: []string{sa}}); err == nil {
			t.Errorf("service account %q accepted", sa)
		}
	}
	if _, err := psat.New(psat.Config{Client: fakeClient(), Cluster: "bad/name", ServiceAccounts: []string{"a/b"}}); err == nil {
		t.Error("cluster name with a slash accepted")
	}
	if _, err := psat.New(psat.Config{Client: fakeClient(), Cluster: "c"}); err == nil {
		t.Error("no trusted service account accepted")
	}
}

// fakeClient is a clientset that is never called: New only checks its
// configuration.
func fakeClient() kubernetes.Interface {
	c, _ := kubernetes.NewForConfig(&restConfigNowhere)
	return c
}

var restConfigNowhere = rest.Config{Host: "https://127.0.0.1:1"}
