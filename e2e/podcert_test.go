package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshid/meshid/internal/k8stest"
)

// TestPodCertificateSigner: `meshid server --pcr-signer-name` (a real
// process, the real API server) issues a PodCertificateRequest made as the
// kubelet makes it; `meshid certs list` shows the pod certificate with its
// pod and node, `meshid revoke --serial` revokes it like any other, and
// the server's /metrics has the signer's queue depth and issue latency.
// Bad signer flags exit 1 with one line.
func TestPodCertificateSigner(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--pcr-signer-name", "kubernetes.io/spiffe"}, "reserved for Kubernetes"},
		{[]string{"--pcr-signer-name", "no-slash"}, "want DOMAIN/NAME"},
		{[]string{"--pcr-exclude-namespace", "x"}, "without --pcr-signer-name"},
	} {
		_, errOut, code := runCLI(t, append([]string{"server", "--data-dir", t.TempDir()}, tc.args...)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line with %q", tc.args, code, errOut, tc.want)
		}
	}

	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "pcr-e2e")
	ctx := context.Background()
	sa, err := bed.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "web"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod, err := bed.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web-0"},
		Spec: corev1.PodSpec{NodeName: node.Name, ServiceAccountName: "web", Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app:1"}}}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	base := sockDir(t)
	admin := "--admin-socket=" + filepath.Join(base, "admin", "admin.sock")
	signer := fmt.Sprintf("meshid.test/e2e-%d", time.Now().UnixNano())
	srv := startMeshid(t, "server", "--data-dir", filepath.Join(base, "data"), admin,
		"--socket", filepath.Join(base, "w", "workload.sock"), "--metrics-listen", "127.0.0.1:0",
		"--kubeconfig", bed.Kubeconfig, "--pcr-signer-name", signer, "--k8s-trust-bundle-signer", signer)
	serving := srv.waitLine(t, "msg=serving")
	m := regexp.MustCompile(`\bmetrics=(\S+)`).FindStringSubmatch(serving)
	if m == nil {
		t.Fatalf("no metrics address in %s", serving)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	maxSec := int32(86400)
	pcr, err := bed.Client.CertificatesV1().PodCertificateRequests(ns).Create(ctx, &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "req-"},
		Spec: certv1.PodCertificateRequestSpec{SignerName: signer, PodName: pod.Name, PodUID: pod.UID,
			ServiceAccountName: sa.Name, ServiceAccountUID: sa.UID, NodeName: types.NodeName(node.Name), NodeUID: node.UID,
			MaxExpirationSeconds: &maxSec, StubPKCS10Request: csr},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(pcr.Status.Conditions) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("not issued within 30 s; server log:\n%s", srv.output())
		}
		time.Sleep(20 * time.Millisecond)
		if pcr, err = bed.Client.CertificatesV1().PodCertificateRequests(ns).Get(ctx, pcr.Name, metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if c := pcr.Status.Conditions[0]; c.Type != certv1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("condition %+v", c)
	}
	blk, _ := pem.Decode([]byte(pcr.Status.CertificateChain))
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	serial := leaf.SerialNumber.Text(16)

	// The chain verifies against what a pod mounts: the ClusterTrustBundles
	// published for this signer, selected by the trust-domain label, as the
	// kubelet's clusterTrustBundle projection selects them.
	var chain []*x509.Certificate
	for rest := []byte(pcr.Status.CertificateChain); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	roots := x509.NewCertPool()
	for deadline := time.Now().Add(30 * time.Second); ; {
		ctbs, err := bed.Client.CertificatesV1().ClusterTrustBundles().List(ctx, metav1.ListOptions{
			FieldSelector: "spec.signerName=" + signer, LabelSelector: "meshid.io/trust-domain=cluster.local"})
		if err != nil {
			t.Fatal(err)
		}
		if len(ctbs.Items) > 0 {
			for _, ctb := range ctbs.Items {
				roots.AppendCertsFromPEM([]byte(ctb.Spec.TrustBundle))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ClusterTrustBundle for %s within 30 s", signer)
		}
		time.Sleep(20 * time.Millisecond) // polling the API server for a condition, with a deadline
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the pod certificate does not verify against the published ClusterTrustBundles: %v", err)
	}
	if got, want := chain[0].URIs, "spiffe://cluster.local/ns/"+ns+"/sa/web"; len(got) != 1 || got[0].String() != want {
		t.Fatalf("leaf URIs %v, want %s", got, want)
	}

	out, errOut, code := runCLI(t, "certs", "list", admin, "-o", "json")
	if code != 0 {
		t.Fatalf("certs list: %s", errOut)
	}
	var rows []struct {
		Serial    string `json:"serial"`
		SpiffeID  string `json:"spiffe_id"`
		Requester string `json:"requester"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("certs list: %v %s", err, out)
	}
	found := false
	for _, r := range rows {
		if strings.TrimLeft(r.Serial, "0") == serial {
			found = r.SpiffeID == "spiffe://cluster.local/ns/"+ns+"/sa/web" && strings.Contains(r.Requester, string(pod.UID)) && strings.Contains(r.Requester, node.Name)
		}
	}
	if !found {
		t.Fatalf("certs list has no pod certificate %s for the pod and node: %s", serial, out)
	}
	if _, errOut, code := runCLI(t, "revoke", admin, "--serial", serial); code != 0 {
		t.Fatalf("revoke: %s", errOut)
	}

	resp, err := http.Get("http://" + m[1] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, w := range []string{"meshid_pcr_queue_depth 0", "meshid_pcr_issue_seconds_count 1"} {
		if !strings.Contains(string(body), w) {
			t.Fatalf("/metrics lacks %q", w)
		}
	}
}
