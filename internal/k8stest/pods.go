package k8stest

import (
	"context"
	"fmt"
	"testing"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CreatePodOn creates service account sa in ns (if absent) and a pod name
// of it bound to node, as the scheduler leaves it: no kubelet runs it.
func (b *Bed) CreatePodOn(ctx context.Context, ns, name, sa, node string) (*corev1.Pod, error) {
	_, err := b.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create service account %s/%s: %w", ns, sa, err)
	}
	pod, err := b.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "meshid:dev"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", ns, name, err)
	}
	return pod, nil
}

// PodOn is CreatePodOn failing t.
func (b *Bed) PodOn(t testing.TB, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	pod, err := b.CreatePodOn(context.Background(), ns, name, sa, node)
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// CreatePodToken mints what the kubelet projects into a pod: a token of
// service account sa for audience aud, valid 1 h, bound to pod (nil: bound
// to nothing).
func (b *Bed) CreatePodToken(ctx context.Context, ns, sa, aud string, pod *corev1.Pod) (string, error) {
	exp := int64(3600)
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: []string{aud}, ExpirationSeconds: &exp}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := b.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token of %s/%s: %w", ns, sa, err)
	}
	return tr.Status.Token, nil
}

// PodToken is CreatePodToken failing t.
func (b *Bed) PodToken(t testing.TB, ns, sa, aud string, pod *corev1.Pod) string {
	t.Helper()
	tok, err := b.CreatePodToken(context.Background(), ns, sa, aud, pod)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
