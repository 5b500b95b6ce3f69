package trustpublish_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/trustpublish"
)

// Rules is the RBAC the publishers need (the shipped ClusterRole must hold
// them): resourceNames cannot narrow create, nor list/watch of
// ClusterTrustBundles (selected by signer, not name), nor update/delete of
// them (names carry CA hashes); the ConfigMaps' list/watch carry a
// metadata.name field selector, so they can be narrowed.
func Rules(signer, cmName string) []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"clustertrustbundles"}, Verbs: []string{"list", "watch", "create", "update", "delete"}},
		{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"signers"}, Verbs: []string{"attest"}, ResourceNames: []string{signer}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"list", "watch", "update", "delete"}, ResourceNames: []string{cmName}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
	}
}

// asServiceAccount binds rules to a fresh service account and returns a
// client acting as it.
func asServiceAccount(t *testing.T, bed *k8stest.Bed, ns string, rules []rbacv1.PolicyRule) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	name := "trust-" + ns
	if len(name) > 63 {
		name = name[:63]
	}
	if _, err := bed.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name}, Rules: rules}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := bed.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "default"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = bed.Client.RbacV1().ClusterRoleBindings().Delete(ctx, name, metav1.DeleteOptions{})
		_ = bed.Client.RbacV1().ClusterRoles().Delete(ctx, name, metav1.DeleteOptions{})
	})
	cfg := rest.CopyConfig(bed.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":default"}
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	k8stest.Track(t, hc.Transport)
	c, err := kubernetes.NewForConfigAndClient(cfg, hc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestPublishersNeedOnlyTheirRules: both publishers do all their work as a
// service account holding Rules and nothing else, and without attest on
// the signer the ClusterTrustBundles are refused.
func TestPublishersNeedOnlyTheirRules(t *testing.T) {
	bed := k8stest.Shared(t)
	ns, excluded := bed.Namespace(t), bed.Namespace(t)
	name := cmName(t)
	c := asServiceAccount(t, bed, ns, Rules(signer, name))
	td := randomTD(t)
	a, bCA := newCA(t, "a"), newCA(t, "b")
	stale := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{trustpublish.ManagedByLabel: trustpublish.ManagedBy}}}
	if _, err := bed.Client.CoreV1().ConfigMaps(excluded).Create(context.Background(), stale, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var b bundleVar
	b.set(a, bCA)
	ctbs, err := trustpublish.NewBundles(trustpublish.BundlesConfig{Client: c, SignerName: signer, TrustDomain: td, Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	cms := trustpublish.NewConfigMaps(trustpublish.ConfigMapsConfig{Client: c, Name: name, Exclude: []string{excluded}, Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	run(t, ctbs)
	run(t, cms)
	waitProjected(t, bed, td, "published as the service account", a, bCA)
	waitCM(t, bed.Client, ns, name, a+bCA, "configmap as the service account")
	b.set(bCA)
	ctbs.Kick()
	cms.Kick()
	waitProjected(t, bed, td, "retired as the service account", bCA)
	waitCM(t, bed.Client, ns, name, bCA, "configmap updated as the service account")
	eventually(t, 10*time.Second, "stale configmap of the excluded namespace deleted", func() (bool, string) {
		_, err := bed.Client.CoreV1().ConfigMaps(excluded).Get(context.Background(), name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	if err := ctbs.Err(); err != nil {
		t.Fatal(err)
	}

	// The same rules without attest: the API server's ClusterTrustBundleAttest
	// admission refuses the create.
	ns2 := bed.Namespace(t)
	noAttest := slices.DeleteFunc(Rules(signer, name), func(r rbacv1.PolicyRule) bool { return slices.Contains(r.Verbs, "attest") })
	c2 := asServiceAccount(t, bed, ns2, noAttest)
	td2 := randomTD(t)
	p2, err := trustpublish.NewBundles(trustpublish.BundlesConfig{Client: c2, SignerName: signer, TrustDomain: td2, Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	run(t, p2)
	eventually(t, 20*time.Second, "refused without attest", func() (bool, string) {
		err := p2.Err()
		return err != nil && strings.Contains(err.Error(), "attest"), fmt.Sprint(err)
	})
	if got := projected(t, bed.Client, signer, td2); len(got) != 0 {
		t.Fatalf("published without attest: %d CAs", len(got))
	}
}
