package trustpublish_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/trustpublish"
)

const signer = "meshid.io/spiffe"

func newBundles(t *testing.T, bed *k8stest.Bed, td string, b *bundleVar) *trustpublish.Bundles {
	t.Helper()
	p, err := trustpublish.NewBundles(trustpublish.BundlesConfig{Client: bed.Client, SignerName: signer, TrustDomain: td,
		Bundle: b.get, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func waitProjected(t *testing.T, bed *k8stest.Bed, td, what string, want ...string) {
	t.Helper()
	eventually(t, 20*time.Second, what, func() (bool, string) {
		got := projected(t, bed.Client, signer, td)
		return slices.Equal(got, sorted(want...)), fmt.Sprintf("%d CAs", len(got))
	})
}

// TestBundlesRotation: against a real API server the CA is published as a
// signer-linked, labelled ClusterTrustBundle; during a rotation's overlap
// both CAs are in the projection; after retirement only the new one is;
// someone's edit or deletion is repaired; another trust domain's bundle
// and a foreign bundle of the same signer are never touched.
func TestBundlesRotation(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx := context.Background()
	td := randomTD(t)
	old, next := newCA(t, "old"), newCA(t, "next")

	// Objects of the same signer that are not this publisher's.
	other := randomTD(t)
	foreign := []*certv1.ClusterTrustBundle{
		{ObjectMeta: metav1.ObjectMeta{Name: "meshid.io:spiffe:" + other + ".ca-0000000000000000",
			Labels: map[string]string{trustpublish.ManagedByLabel: trustpublish.ManagedBy, trustpublish.TrustDomainLabel: other}},
			Spec: certv1.ClusterTrustBundleSpec{SignerName: signer, TrustBundle: newCA(t, "other td")}},
		{ObjectMeta: metav1.ObjectMeta{Name: "meshid.io:spiffe:" + td + ".hand-made"},
			Spec: certv1.ClusterTrustBundleSpec{SignerName: signer, TrustBundle: newCA(t, "unlabelled")}},
	}
	for _, o := range foreign {
		if _, err := bed.Client.CertificatesV1().ClusterTrustBundles().Create(ctx, o, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = bed.Client.CertificatesV1().ClusterTrustBundles().Delete(ctx, o.Name, metav1.DeleteOptions{})
		})
	}

	var b bundleVar
	b.set(old)
	p := newBundles(t, bed, td, &b)
	run(t, p)
	waitProjected(t, bed, td, "first publication", old)

	l, err := bed.Client.CertificatesV1().ClusterTrustBundles().List(ctx, metav1.ListOptions{LabelSelector: trustpublish.TrustDomainLabel + "=" + td})
	if err != nil || len(l.Items) != 1 {
		t.Fatalf("list: %v, %d items", err, len(l.Items))
	}
	got := l.Items[0]
	if !strings.HasPrefix(got.Name, "meshid.io:spiffe:"+td+".ca-") || got.Spec.SignerName != signer || got.Labels[trustpublish.ManagedByLabel] != trustpublish.ManagedBy {
		t.Fatalf("published %s signer %q labels %v", got.Name, got.Spec.SignerName, got.Labels)
	}

	b.set(old, next) // a rotation's overlap: the new CA prepared
	p.Kick()
	waitProjected(t, bed, td, "rotation overlap", old, next)
	// The old CA's object was not rewritten meanwhile: reconciles that
	// find it right leave it alone (no update loop on the API server's
	// form of the PEM).
	if o, err := bed.Client.CertificatesV1().ClusterTrustBundles().Get(ctx, got.Name, metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	} else if o.ResourceVersion != got.ResourceVersion {
		t.Fatalf("the unchanged CA's object was rewritten (resourceVersion %s → %s)", got.ResourceVersion, o.ResourceVersion)
	}
	b.set(next) // the old CA retired
	p.Kick()
	waitProjected(t, bed, td, "after retirement", next)

	// Someone else edits, then deletes, the published object.
	name := ""
	eventually(t, 10*time.Second, "one object left", func() (bool, string) {
		l, err := bed.Client.CertificatesV1().ClusterTrustBundles().List(ctx, metav1.ListOptions{LabelSelector: trustpublish.TrustDomainLabel + "=" + td})
		if err != nil || len(l.Items) != 1 {
			return false, fmt.Sprint(err, l)
		}
		name = l.Items[0].Name
		return true, ""
	})
	cur, err := bed.Client.CertificatesV1().ClusterTrustBundles().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.TrustBundle = newCA(t, "intruder")
	if _, err := bed.Client.CertificatesV1().ClusterTrustBundles().Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitProjected(t, bed, td, "after an edit by someone else", next)
	cur, err = bed.Client.CertificatesV1().ClusterTrustBundles().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(cur.Labels, trustpublish.TrustDomainLabel)
	if _, err := bed.Client.CertificatesV1().ClusterTrustBundles().Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitProjected(t, bed, td, "after its label was removed", next)
	if err := bed.Client.CertificatesV1().ClusterTrustBundles().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitProjected(t, bed, td, "after a deletion", next)

	for _, o := range foreign {
		got, err := bed.Client.CertificatesV1().ClusterTrustBundles().Get(ctx, o.Name, metav1.GetOptions{})
		if err != nil || got.Spec.TrustBundle != o.Spec.TrustBundle {
			t.Fatalf("foreign bundle %s was touched: %v", o.Name, err)
		}
	}
	if err := p.Err(); err != nil {
		t.Fatalf("last reconcile: %v", err)
	}
	// Not meshid's object: the API server holds it, the publisher ignores it.
	if _, err := bed.Client.CertificatesV1().ClusterTrustBundles().Get(ctx, "meshid.io:spiffe:"+td+".hand-made", metav1.GetOptions{}); apierrors.IsNotFound(err) {
		t.Fatal("the unlabelled bundle was deleted")
	}
}

// TestNewBundlesRejects: settings that cannot make valid objects fail at
// start with a reason, not in a retry loop.
func TestNewBundlesRejects(t *testing.T) {
	for _, c := range []struct{ signer, td, want string }{
		{"no-slash", "cluster.local", "DOMAIN/PATH"},
		{"meshid.io/spiffe", strings.Repeat("a", 64), "label value"},
		{"meshid.io/spiffe", "", "label value"},
	} {
		_, err := trustpublish.NewBundles(trustpublish.BundlesConfig{SignerName: c.signer, TrustDomain: c.td})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q %q: %v, want %q", c.signer, c.td, err, c.want)
		}
	}
}
