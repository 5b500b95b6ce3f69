package pcrsigner_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	certv1 "k8s.io/api/certificates/v1"
	certv1beta1 "k8s.io/api/certificates/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/pcrsigner"
	"github.com/meshid/meshid/store"
)

func p256(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestIssue: a request made as the kubelet makes it is Issued with a
// chain that verifies against the server's bundle, whose leaf is an
// X509-SVID for ns/<ns>/sa/<sa> on the request's key, with the status
// times equal to the leaf's and beginRefreshAt inside the API's window;
// the inventory has it with the pod and node.
func TestIssue(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	runSigner(t, signerConfig(bed, p, name))
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	key := p256(t)
	for _, maxSec := range []int32{86400, 3600, 7 * 86400} {
		pcr, err := k.request(context.Background(), name, key, maxSec, nil)
		if err != nil {
			t.Fatal(err)
		}
		got := waitTerminal(t, bed, ns, pcr.Name, 20*time.Second)
		c := condition(got)
		if c.Type != certv1.PodCertificateRequestConditionTypeIssued {
			t.Fatalf("max %d: condition %+v", maxSec, c)
		}
		chain := parseChain(t, got.Status.CertificateChain)
		id, _, err := x509svid.ParseAndVerify(chain, x509bundle.FromX509Authorities(p.srv.TrustDomain(), p.srv.BundleCerts()))
		if err != nil {
			t.Fatalf("max %d: not a valid X509-SVID: %v", maxSec, err)
		}
		if want := "spiffe://cluster.local/ns/" + ns + "/sa/web"; id.String() != want {
			t.Fatalf("id %s, want %s", id, want)
		}
		leaf, _ := x509.ParseCertificate(chain[0])
		if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
			t.Fatal("leaf is not on the request's key")
		}
		nb, na, br := got.Status.NotBefore.Time, got.Status.NotAfter.Time, got.Status.BeginRefreshAt.Time
		if !nb.Equal(leaf.NotBefore) || !na.Equal(leaf.NotAfter) {
			t.Fatalf("status %s..%s, leaf %s..%s", nb, na, leaf.NotBefore, leaf.NotAfter)
		}
		wantLife := min(time.Duration(maxSec)*time.Second, 24*time.Hour)
		if life := na.Sub(nb); life != wantLife {
			t.Fatalf("max %d: lifetime %s, want %s", maxSec, life, wantLife)
		}
		if br.Before(nb.Add(10*time.Minute)) || br.After(na.Add(-10*time.Minute)) {
			t.Fatalf("beginRefreshAt %s outside [%s, %s]", br, nb.Add(10*time.Minute), na.Add(-10*time.Minute))
		}
		rows, _, err := p.srv.Store().ListSVIDs(context.Background(), store.SVIDQuery{})
		if err != nil {
			t.Fatal(err)
		}
		serial := leaf.SerialNumber.Text(16)
		found := false
		for _, r := range rows {
			if r.Serial == serial {
				found = strings.Contains(r.Requester, ns+"/web-0") && strings.Contains(r.Requester, string(k.pod.UID)) &&
					strings.Contains(r.Requester, k.node.Name) && strings.Contains(r.Requester, string(k.node.UID))
			}
		}
		if !found {
			t.Fatalf("serial %s not in the inventory with the pod and node", serial)
		}
	}
}

// TestDenied: a key type meshid does not sign (ECDSA P-521, which the API
// server admits) is Denied/UnsupportedKeyType naming the accepted types;
// unknown userAnnotations are Denied/InvalidUnverifiedUserAnnotations; an
// excluded namespace is Denied by policy. None is Failed.
func TestDenied(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	excluded := bed.Namespace(t)
	cfg := signerConfig(bed, p, name)
	cfg.ExcludeNamespaces = []string{excluded}
	runSigner(t, cfg)
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	ctx := context.Background()

	k521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pcr, err := k.request(ctx, name, k521, 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := condition(waitTerminal(t, bed, ns, pcr.Name, 20*time.Second))
	if c.Type != certv1.PodCertificateRequestConditionTypeDenied || c.Reason != certv1.PodCertificateRequestConditionUnsupportedKeyType ||
		!strings.Contains(c.Message, "ECDSAP256") || !strings.Contains(c.Message, "ECDSAP521") {
		t.Fatalf("P-521: %+v", c)
	}

	pcr, err = k.request(ctx, name, p256(t), 86400, map[string]string{"example.com/colour": "blue"})
	if err != nil {
		t.Fatal(err)
	}
	c = condition(waitTerminal(t, bed, ns, pcr.Name, 20*time.Second))
	if c.Type != certv1.PodCertificateRequestConditionTypeDenied || c.Reason != certv1.PodCertificateRequestConditionInvalidUserConfig ||
		!strings.Contains(c.Message, "example.com/colour") {
		t.Fatalf("annotations: %+v", c)
	}

	kx := newKubelet(t, bed, excluded, "pcr-node", "web", "web-0")
	pcr, err = kx.request(ctx, name, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	c = condition(waitTerminal(t, bed, excluded, pcr.Name, 20*time.Second))
	if c.Type != certv1.PodCertificateRequestConditionTypeDenied || c.Reason != pcrsigner.ReasonNamespaceNotAllowed {
		t.Fatalf("excluded namespace: %+v", c)
	}

	// --pcr-allow-namespace: a namespace not on the list is Denied, one on
	// it is Issued.
	name2 := signerName(t)
	cfg2 := signerConfig(bed, p, name2)
	cfg2.AllowNamespaces = []string{excluded}
	runSigner(t, cfg2)
	pcr, err = k.request(ctx, name2, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	c = condition(waitTerminal(t, bed, ns, pcr.Name, 20*time.Second))
	if c.Type != certv1.PodCertificateRequestConditionTypeDenied || c.Reason != pcrsigner.ReasonNamespaceNotAllowed {
		t.Fatalf("namespace not allowed: %+v", c)
	}
	pcr, err = kx.request(ctx, name2, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c = condition(waitTerminal(t, bed, excluded, pcr.Name, 20*time.Second)); c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("allowed namespace: %+v", c)
	}
}

// TestStatusWriteRefusedIsRetried: while the API refuses the status write
// (as a webhook or quota would), the request is retried, never Failed, and
// it is Issued with the one certificate signed for it once writes pass.
func TestStatusWriteRefusedIsRetried(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	cfg := signerConfig(bed, p, name)
	var refused atomic.Int32
	var open atomic.Bool
	cfg.UpdateStatus = func(ctx context.Context, pcr *certv1.PodCertificateRequest) (*certv1.PodCertificateRequest, error) {
		if !open.Load() {
			refused.Add(1)
			return nil, apierrors.NewForbidden(schema.GroupResource{Group: "certificates.k8s.io", Resource: "podcertificaterequests"}, pcr.Name,
				errors.New(`admission webhook "deny.example.com" denied the request`))
		}
		return bed.Client.CertificatesV1().PodCertificateRequests(pcr.Namespace).UpdateStatus(ctx, pcr, metav1UpdateOptions())
	}
	runSigner(t, cfg)
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	pcr, err := k.request(context.Background(), name, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for refused.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d refused writes", refused.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cur, err := bed.Client.CertificatesV1().PodCertificateRequests(ns).Get(context.Background(), pcr.Name, metav1GetOptions())
	if err != nil {
		t.Fatal(err)
	}
	if c := condition(cur); c != nil {
		t.Fatalf("a refused write left condition %+v", c)
	}
	open.Store(true)
	c := condition(waitTerminal(t, bed, ns, pcr.Name, 40*time.Second))
	if c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("condition %+v", c)
	}
	if n := countRows(t, p, "spiffe://cluster.local/ns/"+ns+"/sa/web"); n != 1 {
		t.Fatalf("%d certificates signed for one request, want 1", n)
	}
}

func countRows(t testing.TB, p *plane, id string) int {
	t.Helper()
	rows, _, err := p.srv.Store().ListSVIDs(context.Background(), store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range rows {
		if r.SpiffeID == id {
			n++
		}
	}
	return n
}

// TestRestartMidBurst: a signer stopped in the middle of a burst and a new
// one started issue every request exactly once: each Issued, and as many
// certificates in the inventory as requests.
func TestRestartMidBurst(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	const n = 200
	var names []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	key := p256(t)
	for i := range 8 {
		wg.Go(func() {
			for j := i; j < n; j += 8 {
				pcr, err := k.request(context.Background(), name, key, 86400, nil)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				names = append(names, pcr.Name)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	first := runSigner(t, signerConfig(bed, p, name))
	id := "spiffe://cluster.local/ns/" + ns + "/sa/web"
	deadline := time.Now().Add(30 * time.Second)
	for countRows(t, p, id) < n/4 {
		if time.Now().After(deadline) {
			t.Fatal("the first signer issued too few")
		}
		time.Sleep(5 * time.Millisecond)
	}
	first.stop()
	before := countRows(t, p, id)
	if before >= n {
		t.Logf("the first signer finished all %d before it stopped", n)
	}
	runSigner(t, signerConfig(bed, p, name))
	serials := map[string]bool{}
	for _, nm := range names {
		got := waitTerminal(t, bed, ns, nm, 60*time.Second)
		if c := condition(got); c.Type != certv1.PodCertificateRequestConditionTypeIssued {
			t.Fatalf("%s: %+v", nm, c)
		}
		leaf, err := x509.ParseCertificate(parseChain(t, got.Status.CertificateChain)[0])
		if err != nil {
			t.Fatal(err)
		}
		serials[leaf.SerialNumber.Text(16)] = true
	}
	if len(serials) != n {
		t.Fatalf("%d distinct certificates for %d requests", len(serials), n)
	}
	if rows := countRows(t, p, id); rows != n {
		t.Fatalf("%d certificates signed for %d requests (%d before the restart)", rows, n, before)
	}
}

// TestIssueV1beta1PKIXKey: a request in a 1.35 kubelet's v1beta1 form
// (pkixPublicKey and proofOfPossession, no stub CSR) is Issued on that key.
func TestIssueV1beta1PKIXKey(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	runSigner(t, signerConfig(bed, p, name))
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	key := p256(t)
	pkix, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(k.pod.UID))
	pop, err := ecdsa.SignASN1(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	maxSec := int32(86400)
	pcr, err := bed.Client.CertificatesV1beta1().PodCertificateRequests(ns).Create(context.Background(), &certv1beta1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "req-"},
		Spec: certv1beta1.PodCertificateRequestSpec{SignerName: name, PodName: k.pod.Name, PodUID: k.pod.UID,
			ServiceAccountName: k.sa.Name, ServiceAccountUID: k.sa.UID, NodeName: types.NodeName(k.node.Name), NodeUID: k.node.UID,
			MaxExpirationSeconds: &maxSec, PKIXPublicKey: pkix, ProofOfPossession: pop},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create v1beta1: %v", err)
	}
	got := waitTerminal(t, bed, ns, pcr.Name, 20*time.Second)
	if c := condition(got); c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("condition %+v", c)
	}
	leaf, err := x509.ParseCertificate(parseChain(t, got.Status.CertificateChain)[0])
	if err != nil {
		t.Fatal(err)
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Fatal("leaf is not on the pkixPublicKey")
	}
}

// TestOnlyLeaderSigns: a replica that does not lead signs nothing; once it
// leads it issues what waited.
func TestOnlyLeaderSigns(t *testing.T) {
	bed := k8stest.Shared(t)
	p := startPlane(t)
	name := signerName(t)
	cfg := signerConfig(bed, p, name)
	var leading, asked atomic.Bool
	cfg.Leading = func() bool { asked.Store(true); return leading.Load() }
	runSigner(t, cfg)
	ns := bed.Namespace(t)
	k := newKubelet(t, bed, ns, "pcr-node", "web", "web-0")
	pcr, err := k.request(context.Background(), name, p256(t), 86400, nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !asked.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the signer never looked at the request")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := countRows(t, p, "spiffe://cluster.local/ns/"+ns+"/sa/web"); n != 0 {
		t.Fatalf("a replica that does not lead signed %d", n)
	}
	leading.Store(true)
	if c := condition(waitTerminal(t, bed, ns, pcr.Name, 20*time.Second)); c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("condition %+v", c)
	}
}
