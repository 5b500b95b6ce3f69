package trustpublish_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/kube/trustpublish"
)

// newCA returns a fresh self-signed CA certificate in PEM.
func newCA(t testing.TB, cn string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// randomTD is a trust domain no other test uses, so tests sharing the bed
// own disjoint sets of ClusterTrustBundles.
func randomTD(t testing.TB) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return "td-" + hex.EncodeToString(b) + ".test"
}

// bundleVar is the bundle a test controls.
type bundleVar struct{ v atomic.Value }

func (b *bundleVar) set(cas ...string) { b.v.Store(strings.Join(cas, "")) }
func (b *bundleVar) get() []byte {
	s, _ := b.v.Load().(string)
	return []byte(s)
}

// run runs r until the test ends and waits for it to stop.
func run(t testing.TB, r interface{ Run(context.Context) }) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// projected is what a kubelet puts in a clusterTrustBundle projection
// selecting signer and the trust domain's label: the set of CA PEMs of
// every matching object, sorted (the kubelet deduplicates and reorders).
func projected(t testing.TB, c kubernetes.Interface, signer, td string) []string {
	t.Helper()
	l, err := c.CertificatesV1().ClusterTrustBundles().List(context.Background(), metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.signerName", signer).String(),
		LabelSelector: labels.SelectorFromSet(labels.Set{trustpublish.TrustDomainLabel: td}).String(),
	})
	if err != nil {
		t.Fatalf("list ClusterTrustBundles: %v", err)
	}
	var out []string
	for _, o := range l.Items {
		rest := []byte(o.Spec.TrustBundle)
		for {
			var blk *pem.Block
			blk, rest = pem.Decode(rest)
			if blk == nil {
				break
			}
			out = append(out, string(pem.EncodeToMemory(blk)))
		}
	}
	sort.Strings(out)
	return out
}

func sorted(s ...string) []string {
	s = append([]string(nil), s...)
	sort.Strings(s)
	return s
}

// eventually polls cond (a condition with a deadline, not a sleep).
func eventually(t testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %v; last: %s", what, d, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
