package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/internal/k8stest"
)

// k8sTokenFile writes what the kubelet projects into the pod (a token of
// sa for aud bound to pod) to a 0600 file and returns its path.
func k8sTokenFile(t *testing.T, bed *k8stest.Bed, dir, ns, sa, aud string, pod *corev1.Pod) string {
	t.Helper()
	f := filepath.Join(dir, pod.Name+"-"+aud+".token")
	if err := os.WriteFile(f, []byte(bed.PodToken(t, ns, sa, aud, pod)), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// k8sServer starts `meshid server` against the test bed: agents of
// ns/meshid-agent attest with k8s_psat, pods get default identities, and
// the bundle is kept in ConfigMap meshid-bundle of ns. It returns the
// process, the agent API address and the admin flag.
func k8sServer(t *testing.T, bed *k8stest.Bed, base, ns string, extra ...string) (*proc, string, string) {
	t.Helper()
	admin := filepath.Join(base, "admin", "admin.sock")
	args := append([]string{"server", "--data-dir", filepath.Join(base, "server-data"), "--admin-socket", admin,
		"--socket", filepath.Join(base, "server", "workload.sock"), "--agent-listen", "127.0.0.1:0",
		"--kubeconfig", bed.Kubeconfig, "--k8s-cluster", "testbed", "--k8s-agent-service-account", ns + "/meshid-agent",
		"--k8s-default-identity", "--k8s-bundle-configmap", "meshid-bundle", "--k8s-namespace", ns}, extra...)
	srv := startMeshid(t, args...)
	serving := srv.waitLine(t, "msg=serving")
	m := regexp.MustCompile(`\bagent_api=(\S+)`).FindStringSubmatch(serving)
	if m == nil {
		t.Fatalf("serving line has no agent_api: %s", serving)
	}
	return srv, m[1], "--admin-socket=" + admin
}

// k8sBundleFile waits for the server to publish its bundle in the
// ConfigMap and writes it where the DaemonSet would mount it.
func k8sBundleFile(t *testing.T, c kubernetes.Interface, ns, dir string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		cm, err := c.CoreV1().ConfigMaps(ns).Get(context.Background(), "meshid-bundle", metav1.GetOptions{})
		if err == nil && strings.Contains(cm.Data["bundle.pem"], "BEGIN CERTIFICATE") {
			f := filepath.Join(dir, "bundle.pem")
			if err := os.WriteFile(f, []byte(cm.Data["bundle.pem"]), 0o644); err != nil {
				t.Fatal(err)
			}
			return f
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server published no bundle ConfigMap in 30 s (last: %v)", err)
		}
		time.Sleep(50 * time.Millisecond) // polling the API server for a condition, with a deadline
	}
}

func startK8sAgent(t *testing.T, server, bundle, dataDir, socket, tokenFile string) agentProc {
	t.Helper()
	p := startMeshid(t, "agent", "--server", server, "--data-dir", dataDir, "--socket", socket, "--metrics-listen", "127.0.0.1:0",
		"--node-attestor", "k8s_psat", "--k8s-token-path", tokenFile, "--trust-bundle", bundle)
	return agentProc{proc: p, socket: socket}
}

// TestK8sNodeAttestation: with a real kube-apiserver, `meshid server
// --kubeconfig` publishes its bundle in a ConfigMap, and `meshid agent
// --node-attestor k8s_psat` verifies the server with it and attests with
// the pod-bound token of its pod: it gets the node SVID
// spiffe://<td>/meshid/agent/k8s_psat/<cluster>/<node-uid>, `agent list`
// shows the node's selectors, and a restart attests again with a fresh
// token. A token for another audience, of an untrusted service account or
// of a deleted pod is refused: the agent exits 1 saying why.
func TestK8sNodeAttestation(t *testing.T) {
	bed := k8stest.Shared(t)
	c := bed.Client
	ns := bed.Namespace(t)
	node := bed.Node(t, "e2e")
	base := publicTemp(t)
	_, agentAPI, adminFlag := k8sServer(t, bed, base, ns)
	bundle := k8sBundleFile(t, c, ns, base)

	pod := bed.PodOn(t, ns, "meshid-agent-0", "meshid-agent", node.Name)
	tok := k8sTokenFile(t, bed, base, ns, "meshid-agent", "meshid", pod)
	dataDir := filepath.Join(base, "agent-data")
	a := startK8sAgent(t, agentAPI, bundle, dataDir, filepath.Join(base, "agent", "workload.sock"), tok)
	wantID := "spiffe://cluster.local/meshid/agent/k8s_psat/testbed/" + string(node.UID)
	if l := a.waitLine(t, "attested"); !strings.Contains(l, "node_id="+wantID) {
		t.Fatalf("agent attested as %s, want %s", l, wantID)
	}
	a.waitFor(t, "connected to the server")
	out, stderr, code := runCLI(t, "agent", "list", adminFlag, "-o", "json")
	if code != 0 {
		t.Fatalf("agent list: %s", stderr)
	}
	var list []struct {
		ID        string   `json:"id"`
		Method    string   `json:"method"`
		Node      string   `json:"node"`
		Selectors []string `json:"selectors"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 {
		t.Fatalf("agent list -o json: %v: %s", err, out)
	}
	got := list[0]
	if got.ID != wantID || got.Method != "k8s_psat" || got.Node != node.Name ||
		!strings.Contains(strings.Join(got.Selectors, " "), "k8s_psat:node-uid:"+string(node.UID)) ||
		!strings.Contains(strings.Join(got.Selectors, " "), "k8s_psat:agent-sa:meshid-agent") {
		t.Fatalf("agent list: %+v", got)
	}

	// A restart attests again, with a freshly projected token.
	a.signal(t, 9)
	a.wait(t)
	tok2 := k8sTokenFile(t, bed, base, ns, "meshid-agent", "meshid", pod)
	a = startK8sAgent(t, agentAPI, bundle, dataDir, filepath.Join(base, "agent", "workload.sock"), tok2)
	if l := a.waitLine(t, "attested"); !strings.Contains(l, "node_id="+wantID) {
		t.Fatalf("restarted agent attested as %s", l)
	}
	a.waitFor(t, "connected to the server")

	// Evicted, it attests again by itself: the kubelet keeps its token
	// fresh, so no operator step is needed (a join-token agent would need
	// a new token).
	if _, stderr, code := runCLI(t, "agent", "evict", adminFlag, wantID); code != 0 {
		t.Fatalf("agent evict: %s", stderr)
	}
	a.waitFor(t, "evicted by the server: attesting again")
	if l := a.waitLine(t, "attested"); !strings.Contains(l, "node_id="+wantID) {
		t.Fatalf("agent attested after eviction as %s", l)
	}
	a.waitFor(t, "connected to the server")

	refused := func(what, tokenFile, says string) {
		t.Helper()
		p := startK8sAgent(t, agentAPI, bundle, filepath.Join(base, what+"-data"), filepath.Join(base, what, "workload.sock"), tokenFile)
		if code := p.wait(t); code != 1 || !strings.Contains(p.output(), "attestation refused") || !regexp.MustCompile(says).MatchString(p.output()) {
			t.Fatalf("agent with %s: exit %d, want 1 saying %q:\n%s", what, code, says, p.output())
		}
	}
	refused("audience", k8sTokenFile(t, bed, base, ns, "meshid-agent", "kubernetes", pod), "audience")
	intruder := bed.PodOn(t, ns, "intruder-0", "intruder", node.Name)
	refused("untrusted", k8sTokenFile(t, bed, base, ns, "intruder", "meshid", intruder), "not trusted")
	doomed := bed.PodOn(t, ns, "meshid-agent-1", "meshid-agent", node.Name)
	doomedTok := k8sTokenFile(t, bed, base, ns, "meshid-agent", "meshid", doomed)
	zero := int64(0)
	if err := c.CoreV1().Pods(ns).Delete(context.Background(), doomed.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	// The API server's token cache or meshid's own pod check, whichever
	// answers first.
	refused("deleted", doomedTok, "no longer exists|has been invalidated")
}

// TestPodDefaultIdentity: the whole Kubernetes path with no entry at all.
// `meshid server --k8s-default-identity` and `meshid agent --node-attestor
// k8s_psat --kubeconfig --node-name` (real processes, the real API server);
// workloads as uid 65534 in cgroups carrying their pod's container ID. Each
// pod's process gets spiffe://<td>/ns/<ns>/sa/<sa> over the Workload API
// and SDS; a pod created while the agent runs gets its identity too; a
// pod in an excluded namespace gets none; deleting a pod ends its
// workloads' identity while the other pod keeps its own.
func TestPodDefaultIdentity(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as another uid and to make cgroups")
	}
	bed := k8stest.Shared(t)
	c := bed.Client
	ctx := context.Background()
	ns := bed.Namespace(t)
	excluded := bed.Namespace(t)
	node := bed.Node(t, "dflt")
	for _, nsa := range [][2]string{{ns, "web"}, {ns, "db"}, {ns, "cart"}, {excluded, "sys"}} {
		if _, err := c.CoreV1().ServiceAccounts(nsa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: nsa[1]}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	webID, dbID, sysID := containerID(), containerID(), containerID()
	web := runningPod(t, ns, "web-0", "web", node.Name, webID)
	db := runningPod(t, ns, "db-0", "db", node.Name, dbID)
	sys := runningPod(t, excluded, "sys-0", "sys", node.Name, sysID)

	base := publicTemp(t)
	bin := workloadBinary(t, base)
	_, agentAPI, adminFlag := k8sServer(t, bed, base, ns, "--k8s-exclude-namespace", excluded)
	bundle := k8sBundleFile(t, c, ns, base)
	agentPod := bed.PodOn(t, ns, "meshid-agent-0", "meshid-agent", node.Name)
	tok := k8sTokenFile(t, bed, base, ns, "meshid-agent", "meshid", agentPod)

	cg := newCgroupPlacer(t, false)
	socket := filepath.Join(base, "agent", "workload.sock")
	a := startMeshid(t, append([]string{"agent", "--server", agentAPI, "--data-dir", filepath.Join(base, "agent-data"), "--socket", socket,
		"--trust-bundle", bundle, "--node-attestor", "k8s_psat", "--k8s-token-path", tok,
		"--kubeconfig", bed.Kubeconfig, "--node-name", node.Name}, cg.agentArgs()...)...)
	a.waitLine(t, "watching this node's pods")
	a.waitLine(t, "connected to the server")

	watch := startPodChild(t, bin, "watch", socket, "", cg.place(t, string(web.UID), webID))
	watch.waitNext(t, "ids=web")
	sdsW := startPodChild(t, bin, "sds", socket, "", cg.place(t, string(web.UID), webID))
	sdsW.waitNext(t, "sds=web")
	if got := startPodChild(t, bin, "fetch", socket, "ids=db", cg.place(t, string(db.UID), dbID)).next(t); got != "ids=db" {
		t.Fatalf("the db pod's workload got %q, want its own identity", got)
	}
	if got := startPodChild(t, bin, "fetch", socket, "err=PermissionDenied", cg.place(t, string(sys.UID), sysID)).next(t); got != "err=PermissionDenied" {
		t.Fatalf("a pod in an excluded namespace got %q, want no identity", got)
	}
	// No entry was made: the identities are the server's defaults.
	if out, _, _ := runCLI(t, "entry", "list", adminFlag, "-o", "json"); strings.Contains(out, "spiffe://") {
		t.Fatalf("entries exist: %s", out)
	}

	// A pod scheduled now: the server's informer and the agent's see it,
	// and its process gets its identity.
	cartID := containerID()
	cart := runningPod(t, ns, "cart-0", "cart", node.Name, cartID)
	if got := startPodChild(t, bin, "fetch", socket, "ids=cart", cg.place(t, string(cart.UID), cartID)).next(t); got != "ids=cart" {
		t.Fatalf("a pod created while the agent runs got %q", got)
	}

	zero := int64(0)
	if err := c.CoreV1().Pods(ns).Delete(ctx, web.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	if got := watch.next(t); got != "err=PermissionDenied" {
		t.Fatalf("Workload API watch after its pod was deleted: %q, want the stream ended", got)
	}
	if got := sdsW.next(t); got != "sds-end=PermissionDenied" {
		t.Fatalf("SDS stream after its pod was deleted: %q, want it ended", got)
	}
	if got := startPodChild(t, bin, "fetch", socket, "ids=db", cg.place(t, string(db.UID), dbID)).next(t); got != "ids=db" {
		t.Fatalf("the db pod after web's deletion: %q", got)
	}
}
