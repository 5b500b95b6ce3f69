package pcrsigner_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/internal/k8stest"
)

// signerRules are the RBAC rules the signer needs (the shipped ClusterRole
// must grant them), for signer name.
func signerRules(name string, withSign bool) []rbacv1.PolicyRule {
	r := []rbacv1.PolicyRule{
		{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"podcertificaterequests"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"podcertificaterequests/status"}, Verbs: []string{"update"}},
	}
	if withSign {
		r = append(r, rbacv1.PolicyRule{APIGroups: []string{"certificates.k8s.io"}, Resources: []string{"signers"}, ResourceNames: []string{name}, Verbs: []string{"sign"}})
	}
	return r
}

// clientAs is a client authenticated as a fresh service account bound to
// a ClusterRole of rules.
func clientAs(t *testing.T, bed *k8stest.Bed, ns string, rules []rbacv1.PolicyRule) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	sa, err := bed.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{GenerateName: "signer-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	role := ns + "-" + sa.Name
	if _, err := bed.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: role}, Rules: rules}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := bed.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = bed.Client.RbacV1().ClusterRoleBindings().Delete(context.Background(), role, metav1.DeleteOptions{})
		_ = bed.Client.RbacV1().ClusterRoles().Delete(context.Background(), role, metav1.DeleteOptions{})
	})
	tr, err := bed.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa.Name, &authv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rc := rest.AnonymousClientConfig(bed.Config)
	rc.BearerToken = tr.Status.Token
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		t.Fatal(err)
	}
	k8stest.Track(t, hc.Transport)
	c, err := kubernetes.NewForConfigAndClient(rc, hc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestLeastRBAC: the signer works with exactly signerRules, and without
// `sign` on its signer name the API server refuses the status write,
// which the signer retries: the request is left pending, never Failed.
func TestLeastRBAC(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")

	name := signerName(t)
	cfg := signerConfig(bed, p, name)
	cfg.Client = clientAs(t, bed, ns, signerRules(name, true))
	runSigner(t, cfg)
	pcr, err := k.request(context.Background(), name, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c := condition(waitTerminal(t, bed, ns, pcr.Name, 20*time.Second)); c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("with the rules: %+v", c)
	}

	name2 := signerName(t)
	cfg2 := signerConfig(bed, p, name2)
	restricted := clientAs(t, bed, ns, signerRules(name2, false))
	cfg2.Client = restricted
	var forbidden atomic.Int32
	cfg2.UpdateStatus = func(ctx context.Context, pcr *certv1.PodCertificateRequest) (*certv1.PodCertificateRequest, error) {
		got, err := restricted.CertificatesV1().PodCertificateRequests(pcr.Namespace).UpdateStatus(ctx, pcr, metav1.UpdateOptions{})
		// The API server answers 422 with a Forbidden cause on signerName.
		if err != nil && strings.Contains(err.Error(), `not permitted to "sign"`) {
			forbidden.Add(1)
		}
		return got, err
	}
	runSigner(t, cfg2)
	pcr, err = k.request(context.Background(), name2, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for forbidden.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d forbidden status writes, want 3", forbidden.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cur, err := bed.Client.CertificatesV1().PodCertificateRequests(ns).Get(context.Background(), pcr.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c := condition(cur); c != nil {
		t.Fatalf("without sign: condition %+v, want none", c)
	}
	if n := countRows(t, p, "spiffe://cluster.local/ns/"+ns+"/sa/web"); n != 2 {
		t.Fatalf("%d certificates signed, want 2 (one per request: retries reuse it)", n)
	}
}
