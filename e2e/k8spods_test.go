package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/internal/k8stest"
)

// A pod workload child is this test binary that waits for "go" on stdin
// (by then the test has put it in its pod's cgroup) and then watches the
// Workload API, streams SDS, or fetches once, printing what it gets.
const (
	podModeEnv = "MESHID_E2E_POD_MODE" // watch, sds or fetch
	podSockEnv = "MESHID_E2E_POD_SOCK"
	podWantEnv = "MESHID_E2E_POD_WANT" // fetch: the line to wait for
)

func init() {
	mode := os.Getenv(podModeEnv)
	if mode == "" {
		return
	}
	in := bufio.NewReader(os.Stdin)
	if line, err := in.ReadString('\n'); err != nil || line != "go\n" {
		fmt.Fprintln(os.Stderr, "pod workload: no go:", err)
		os.Exit(2)
	}
	sock := os.Getenv(podSockEnv)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, _ = io.Copy(io.Discard, in)
		cancel()
	}()
	switch mode {
	case "fetch":
		os.Exit(wlFetch(workloadapi.WithAddr("unix://"+sock), os.Getenv(podWantEnv)))
	case "watch":
		err := workloadapi.WatchX509Context(ctx, lineWatcher{}, workloadapi.WithAddr("unix://"+sock))
		if err != nil && !errors.Is(err, context.Canceled) && ctx.Err() == nil {
			fmt.Fprintln(os.Stderr, "watch:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "sds":
		os.Exit(sdsStream(ctx, sock))
	}
	fmt.Fprintln(os.Stderr, "unknown pod workload mode", mode)
	os.Exit(2)
}

// sdsStream holds one SDS stream for the default secret, printing
// "sds=<last path segment of the SPIFFE ID>" for every certificate pushed
// and "sds-end=<code>" when the stream ends.
func sdsStream(ctx context.Context, sock string) int {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "sds:", err)
		return 1
	}
	defer conn.Close()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sds:", err)
		return 1
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "envoy"}, TypeUrl: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", ResourceNames: []string{"default"}}); err != nil {
		fmt.Fprintln(os.Stderr, "sds:", err)
		return 1
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() == nil {
				fmt.Println("sds-end=" + status.Code(err).String())
			}
			<-ctx.Done()
			return 0
		}
		for _, r := range resp.GetResources() {
			var sec tlsv3.Secret
			if err := r.UnmarshalTo(&sec); err != nil {
				fmt.Fprintln(os.Stderr, "sds:", err)
				return 1
			}
			blk, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			if blk == nil {
				fmt.Fprintln(os.Stderr, "sds: no certificate in", r.GetTypeUrl())
				return 1
			}
			leaf, err := x509.ParseCertificate(blk.Bytes)
			if err != nil || len(leaf.URIs) != 1 {
				fmt.Fprintln(os.Stderr, "sds: leaf:", err)
				return 1
			}
			id := leaf.URIs[0].String()
			fmt.Println("sds=" + id[strings.LastIndex(id, "/")+1:])
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "envoy"}, TypeUrl: resp.GetTypeUrl(), ResourceNames: []string{"default"},
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			fmt.Fprintln(os.Stderr, "sds ack:", err)
		}
	}
}

// podChild is a pod workload child; lines carries what it prints.
type podChild struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	last  string
}

// startPodChild starts a child as uid 65534 in mode, places it (place
// gets its pid: moves it into the container's cgroup), then lets it go.
func startPodChild(t *testing.T, bin, mode, socket, want string, place func(pid int)) *podChild {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), podModeEnv+"="+mode, podSockEnv+"="+socket, podWantEnv+"="+want)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &podChild{cmd: cmd, stdin: stdin, lines: make(chan string, 64)}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	// Registered before place's clean-up, so it runs after: the process
	// must have left a cgroup before it can be removed.
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { <-copied; done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("pod workload %s did not stop", mode)
		}
	})
	place(cmd.Process.Pid)
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	return c
}

// next returns the child's next line that differs from the one before.
func (c *podChild) next(t *testing.T) string {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l := <-c.lines:
			if l != c.last {
				c.last = l
				return l
			}
		case <-deadline:
			t.Fatal("pod workload printed nothing new for 30s")
			return ""
		}
	}
}

// waitNext waits for the line want, skipping others (a watch may first say
// it holds nothing while the entries reach the agent).
func (c *podChild) waitNext(t *testing.T, want string) {
	t.Helper()
	for {
		if l := c.next(t); l == want {
			return
		} else if !strings.HasPrefix(l, "err=") && !strings.HasPrefix(l, "ids=") && !strings.HasPrefix(l, "sds") {
			t.Fatalf("pod workload said %q waiting for %q", l, want)
		}
	}
}

// cgroupPlacer puts processes in cgroup v2 directories named as the
// kubelet's systemd driver names a containerd container, under a test
// directory of the cgroup2 mount; or, where cgroups cannot be made, writes
// the same path as the process's cgroup file in a --proc-root tree.
type cgroupPlacer struct {
	base     string // the test's cgroup directory; "" in tree mode
	procRoot string // tree mode: the tree
}

func newCgroupPlacer(t *testing.T, tree bool) *cgroupPlacer {
	t.Helper()
	if mnt := cgroup2Mount(); mnt != "" && !tree {
		var b [6]byte
		_, _ = rand.Read(b[:])
		base := filepath.Join(mnt, "meshid-e2e-"+hex.EncodeToString(b[:]))
		if err := os.Mkdir(base, 0o755); err == nil {
			p := &cgroupPlacer{base: base}
			t.Cleanup(func() { removeCgroups(t, base) })
			return p
		} else {
			t.Logf("cgroup v2 at %s is not writable (%v): a --proc-root tree stands in", mnt, err)
		}
	} else if !tree {
		t.Log("no cgroup v2 mount: a --proc-root tree stands in")
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &cgroupPlacer{procRoot: dir}
}

// place puts pid in pod podUID's container cid.
func (p *cgroupPlacer) place(t *testing.T, podUID, cid string) func(int) {
	rel := "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(podUID, "-", "_") + ".slice/cri-containerd-" + cid + ".scope"
	return func(pid int) {
		t.Helper()
		if p.base == "" {
			d := filepath.Join(p.procRoot, strconv.Itoa(pid))
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, "cgroup"), []byte("0::/"+rel+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		dir := filepath.Join(p.base, rel)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			t.Fatalf("move pid %d into %s: %v", pid, dir, err)
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil || !strings.Contains(string(b), "cri-containerd-"+cid+".scope") {
			t.Fatalf("pid %d's cgroup after the move: %q, %v", pid, b, err)
		}
	}
}

// agentArgs are the flags that point the agent at the tree in tree mode.
func (p *cgroupPlacer) agentArgs() []string {
	if p.base == "" {
		return []string{"--proc-root", p.procRoot}
	}
	return nil
}

// cgroup2Mount returns where cgroup v2 is mounted ("" if nowhere): the
// unified hierarchy, or its hybrid-mode mount beside v1's.
func cgroup2Mount() string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(b)) {
		// ... mount-point ... - fstype source options
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		if f := strings.Fields(pre); len(f) >= 5 {
			return f[4]
		}
	}
	return ""
}

// removeCgroups removes the test's cgroup tree, deepest first (a cgroup
// directory is removed with rmdir once it holds no process).
func removeCgroups(t *testing.T, base string) {
	var dirs []string
	_ = filepath.WalkDir(base, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := syscall.Rmdir(dirs[i])
			if err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", dirs[i], err)
				break
			}
			time.Sleep(20 * time.Millisecond) // an exited process leaves its cgroup a moment later
		}
	}
}

// Workload attestation end to end, with real processes: `meshid server`,
// `meshid agent --kubeconfig --node-name` watching the test bed's pods, and
// workloads as uid 65534 placed in cgroups whose paths carry their pod's
// container IDs. An entry with k8s:ns and k8s:sa gives each pod its own
// identity over the Workload API (go-spiffe) and SDS; deleting a pod ends
// its workloads' streams at once (the removal: PermissionDenied), its
// SVID is no longer served or renewed, its process can attest no more, and
// the other pod keeps its identity. The same again with the cgroup files
// in a --proc-root tree (what stands in where cgroups cannot be made).
func TestPodWorkloadAttestation(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as another uid and to make cgroups")
	}
	t.Run("cgroup", func(t *testing.T) { testPodWorkloadAttestation(t, false) })
	t.Run("proc-root tree", func(t *testing.T) { testPodWorkloadAttestation(t, true) })
}

func testPodWorkloadAttestation(t *testing.T, tree bool) {
	bed := k8stest.Shared(t)
	t.Cleanup(func() {
		// The bed's client keeps idle keep-alive connections: goleak
		// would take their goroutines for leaks.
		if rc, ok := bed.Client.CoreV1().RESTClient().(*rest.RESTClient); ok {
			utilnet.CloseIdleConnectionsFor(rc.Client.Transport)
		}
	})
	ctx := context.Background()
	ns := bed.Namespace(t)
	node := bed.Node(t, "wl")
	for _, sa := range []string{"web", "db"} {
		if _, err := bed.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	webID, dbID := containerID(), containerID()
	web := runningPod(t, ns, "web-0", "web", node.Name, webID)
	db := runningPod(t, ns, "db-0", "db", node.Name, dbID)

	base := publicTemp(t)
	bin := workloadBinary(t, base)
	admin := filepath.Join(base, "admin", "admin.sock")
	srv := startMeshid(t, "server", "--data-dir", filepath.Join(base, "server-data"), "--admin-socket", admin,
		"--socket", filepath.Join(base, "server", "workload.sock"), "--agent-listen", "127.0.0.1:0")
	m := regexp.MustCompile(`\bagent_api=(\S+)`).FindStringSubmatch(srv.waitLine(t, "msg=serving"))
	if m == nil {
		t.Fatal("serving line has no agent_api")
	}
	adminFlag := "--admin-socket=" + admin
	pem, stderr, code := runCLI(t, "bundle", "show", adminFlag)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	bundle := filepath.Join(base, "bundle.pem")
	if err := os.WriteFile(bundle, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	tok, stderr, code := runCLI(t, "token", "create", adminFlag, "--agent", "--node-id", node.Name, "--ttl", "10m")
	if code != 0 {
		t.Fatalf("token create: %s", stderr)
	}
	for _, sa := range []string{"web", "db"} {
		if _, stderr, code := runCLI(t, "entry", "create", adminFlag, "--spiffe-id", "spiffe://cluster.local/ns/"+ns+"/sa/"+sa,
			"--selector", "k8s:ns:"+ns, "--selector", "k8s:sa:"+sa); code != 0 {
			t.Fatalf("entry create with k8s selectors: %s", stderr)
		}
	}

	cg := newCgroupPlacer(t, tree)
	socket := filepath.Join(base, "agent", "workload.sock")
	args := append([]string{"agent", "--server", m[1], "--data-dir", filepath.Join(base, "agent-data"), "--socket", socket,
		"--trust-bundle", bundle, "--join-token", strings.TrimSpace(tok),
		"--kubeconfig", bed.Kubeconfig, "--node-name", node.Name, "--metrics-listen", "127.0.0.1:0"}, cg.agentArgs()...)
	agentProc := startMeshid(t, args...)
	agentProc.waitLine(t, "watching this node's pods")
	mm := regexp.MustCompile(`\bmetrics=(\S+)`).FindStringSubmatch(agentProc.waitLine(t, "agent serving"))
	if mm == nil {
		t.Fatal("agent serving line without metrics")
	}
	metrics := mm[1]

	watch := startPodChild(t, bin, "watch", socket, "", cg.place(t, string(web.UID), webID))
	watch.waitNext(t, "ids=web")
	sdsW := startPodChild(t, bin, "sds", socket, "", cg.place(t, string(web.UID), webID))
	sdsW.waitNext(t, "sds=web")
	dbLine := startPodChild(t, bin, "fetch", socket, "ids=db", cg.place(t, string(db.UID), dbID)).next(t)
	if dbLine != "ids=db" {
		t.Fatalf("the db pod's workload got %q, want its own identity", dbLine)
	}
	// The db fetcher has gone: web's SVID, held by its two streams, is
	// the one served (and renewed).
	waitAgentMetric(t, metrics, "meshid_agent_served_svids 1")

	zero := int64(0)
	if err := bed.Client.CoreV1().Pods(ns).Delete(ctx, web.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	// Both streams end at once: nothing was due to be sent, so this is the
	// agent acting on the pod's deletion, not a send's re-check.
	if got := watch.next(t); got != "err=PermissionDenied" {
		t.Fatalf("Workload API watch after its pod was deleted: %q, want the stream ended (PermissionDenied)", got)
	}
	if got := sdsW.next(t); got != "sds-end=PermissionDenied" {
		t.Fatalf("SDS stream after its pod was deleted: %q, want it ended (PermissionDenied)", got)
	}
	// Nobody holds web's SVID any more: it is not renewed.
	waitAgentMetric(t, metrics, "meshid_agent_served_svids 0")
	// Its process, still in the pod's cgroup, can attest no more (go-spiffe
	// keeps re-dialling: each says PermissionDenied, nothing else).
	again := startPodChild(t, bin, "fetch", socket, "err=PermissionDenied", cg.place(t, string(web.UID), webID)).next(t)
	if again != "err=PermissionDenied" {
		t.Fatalf("a new caller of the deleted pod got %q", again)
	}
	if !strings.Contains(agentProc.output(), "pod gone: its workloads' identities withdrawn") {
		t.Errorf("the agent did not log the withdrawal:\n%s", agentProc.output())
	}
	// The other pod keeps its own.
	if got := startPodChild(t, bin, "fetch", socket, "ids=db", cg.place(t, string(db.UID), dbID)).next(t); got != "ids=db" {
		t.Fatalf("the db pod after web's deletion: %q", got)
	}
}

// containerID is a fresh containerd-style container ID.
func containerID() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// runningPod creates a pod bound to node whose status says container app
// runs with ID cid, as a kubelet would patch it.
func runningPod(t *testing.T, ns, name, sa, node, cid string) *corev1.Pod {
	t.Helper()
	bed := k8stest.Shared(t)
	ctx := context.Background()
	p, err := bed.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "example.org/" + name + ":1"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", Image: "example.org/" + name + ":1", ContainerID: "containerd://" + cid,
		Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}}
	p, err = bed.Client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}
