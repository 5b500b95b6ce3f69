package podattest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/peer"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/internal/k8stest"
)

// childEnv makes the test binary a workload: it connects to the unix
// socket the variable names, says "connected", and exits when stdin
// closes.
const childEnv = "MESHID_PODATTEST_CHILD"

func TestMain(m *testing.M) {
	if sock := os.Getenv(childEnv); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		fmt.Println("connected")
		io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const waitLong = 30 * time.Second

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// workload is a real child process connected to a socket of ours, tracked
// as the workload socket tracks its callers, with its cgroup file in a
// procfs tree of the test's (the attestor's ProcRoot).
type workload struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	conn  net.Conn
	pc    attest.PeerCred
}

func (w *workload) ctx() context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: w.pc})
}

func (w *workload) stop() {
	w.stdin.Close()
	w.cmd.Wait()
}

// startWorkload runs a child and writes cgroup as its procRoot/<pid>/cgroup.
func startWorkload(t *testing.T, procRoot, cgroup string) *workload {
	t.Helper()
	dir, err := os.MkdirTemp("", "meshid-pod-") // short: socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+sock)
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
	w := &workload{cmd: cmd, stdin: stdin}
	t.Cleanup(w.stop)
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("child said %q: %v", line, err)
	}
	raw, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn, info, err := attest.UnixCredentials().ServerHandshake(raw)
	if err != nil {
		raw.Close()
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	w.conn, w.pc = conn, info.(attest.PeerCred)
	if w.pc.Process() == nil {
		t.Fatal("child not tracked")
	}
	if procRoot != "" {
		writeCgroup(t, procRoot, cmd.Process.Pid, cgroup)
	}
	return w
}

func writeCgroup(t *testing.T, root string, pid int, content string) {
	t.Helper()
	d := filepath.Join(root, strconv.Itoa(pid))
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "cgroup"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// containerdCgroup is the cgroup v2 line of a containerd container under
// the systemd driver.
func containerdCgroup(podUID, cid string) string {
	return "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(podUID, "-", "_") + ".slice/cri-containerd-" + cid + ".scope\n"
}

func newID(t testing.TB, i int) string {
	return fmt.Sprintf("%016x", time.Now().UnixNano()) + fmt.Sprintf("%048x", i)
}

// createPod makes a pod bound to node with an app and a sidecar container
// and an init container; no kubelet runs it.
func createPod(t testing.TB, c kubernetes.Interface, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := c.CoreV1().Pods(ns).Create(ctxT(t), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name, "app.kubernetes.io/part-of": "shop"}},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: sa,
			InitContainers:     []corev1.Container{{Name: "init", Image: "example.org/init:1"}},
			Containers: []corev1.Container{
				{Name: "app", Image: "example.org/app:1"},
				{Name: "envoy", Image: "envoyproxy/envoy:v1.33"},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// setStatus patches the pod's status as a kubelet would: the app and envoy
// containers running with the given IDs (empty: not listed), the init
// container done with initID.
func setStatus(t testing.TB, c kubernetes.Interface, p *corev1.Pod, appID, envoyID, initID string) *corev1.Pod {
	t.Helper()
	ctx := ctxT(t)
	cur, err := c.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Status.Phase = corev1.PodRunning
	cur.Status.ContainerStatuses = nil
	cur.Status.InitContainerStatuses = nil
	if appID != "" {
		cur.Status.ContainerStatuses = append(cur.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: "app", Image: "example.org/app:1", ImageID: "example.org/app@sha256:" + strings.Repeat("ab", 32),
			ContainerID: "containerd://" + appID, Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}},
		})
	}
	if envoyID != "" {
		cur.Status.ContainerStatuses = append(cur.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: "envoy", Image: "docker.io/envoyproxy/envoy:v1.33", ContainerID: "cri-o://" + envoyID,
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}},
		})
	}
	if initID != "" {
		cur.Status.InitContainerStatuses = []corev1.ContainerStatus{{
			Name: "init", Image: "example.org/init:1", ContainerID: "docker://" + initID,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0}},
		}}
	}
	out, err := c.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("update status of %s/%s: %v", p.Namespace, p.Name, err)
	}
	return out
}

func deletePod(t testing.TB, c kubernetes.Interface, p *corev1.Pod) {
	t.Helper()
	zero := int64(0)
	if err := c.CoreV1().Pods(p.Namespace).Delete(ctxT(t), p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
}

// startAttestor starts an attestor for node on the bed, its changes sent
// to the returned channel.
func startAttestor(t testing.TB, bed *k8stest.Bed, node, procRoot string, wait time.Duration) (*Attestor, <-chan string) {
	t.Helper()
	changes := make(chan string, 100)
	a, err := New(Config{Client: bed.Client, NodeName: node, ProcRoot: procRoot, Wait: wait,
		OnChange: func(uid string) {
			select {
			case changes <- uid:
			default:
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a, changes
}

func set(t testing.TB, a *Attestor) *attest.Set {
	t.Helper()
	s, err := attest.NewSet(attest.Unix{}, a)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// waitChange waits until OnChange has told of uid and check then fails
// (a deletion may come as an update, then the delete): the attestor must
// say so by the time OnChange is called, or the agent would not end the
// caller's streams.
func waitChange(t *testing.T, changes <-chan string, uid string, check func() error) error {
	t.Helper()
	deadline := time.After(waitLong)
	for {
		select {
		case got := <-changes:
			if got != uid {
				continue
			}
			if err := check(); err != nil {
				return err
			}
		case <-deadline:
			t.Fatalf("OnChange never told of pod %s with its check failing", uid)
		}
	}
}

// A process in a container of a pod on this node gets the pod's and the
// container's selectors, each of a kind entries may name; its identity
// ends when the pod is deleted, and the attestor says so at once.
func TestAttestPodContainer(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "attest")
	root := t.TempDir()
	app, envoy, initID := newID(t, 1), newID(t, 2), newID(t, 3)
	p := createPod(t, bed.Client, ns, "web-0", "default", node.Name)
	p = setStatus(t, bed.Client, p, app, envoy, initID)
	a, changes := startAttestor(t, bed, node.Name, root, 0)
	s := set(t, a)

	w := startWorkload(t, root, containerdCgroup(string(p.UID), app))
	c, err := s.Caller(w.ctx())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"k8s:ns:" + ns, "k8s:pod-name:web-0", "k8s:pod-uid:" + string(p.UID), "k8s:sa:default",
		"k8s:node-name:" + node.Name, "k8s:container-name:app",
		"k8s:container-image:example.org/app:1", "k8s:container-image:example.org/app@sha256:" + strings.Repeat("ab", 32),
		"k8s:pod-label:app:web-0", "k8s:pod-label:app.kubernetes.io/part-of:shop",
	}
	var k8s []string
	for _, sel := range c.Selectors {
		if strings.HasPrefix(sel, "k8s:") {
			k8s = append(k8s, sel)
			typ, value, _ := strings.Cut(sel, ":")
			if err := attest.Builtin().CheckSelector(typ, value); err != nil {
				t.Errorf("%s, as attested, is refused for entries: %v", sel, err)
			}
		}
	}
	if !slices.Equal(k8s, want) {
		t.Fatalf("k8s selectors\n%q\nwant\n%q", k8s, want)
	}
	if !slices.Contains(c.Selectors, "unix:pid:"+strconv.Itoa(w.cmd.Process.Pid)) {
		t.Fatalf("unix selectors missing: %q", c.Selectors)
	}
	if err := c.Recheck(); err != nil {
		t.Fatalf("live pod: %v", err)
	}

	// The sidecar (CRI-O's id form in the status, its cgroup too) and the
	// init container are attested as themselves.
	sidecar := startWorkload(t, root, "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"+strings.ReplaceAll(string(p.UID), "-", "_")+".slice/crio-"+envoy+".scope\n")
	if c, err := s.Caller(sidecar.ctx()); err != nil || !slices.Contains(c.Selectors, "k8s:container-name:envoy") || !slices.Contains(c.Selectors, "k8s:container-image:docker.io/envoyproxy/envoy:v1.33") {
		t.Fatalf("sidecar: %q, %v", c.Selectors, err)
	}
	initW := startWorkload(t, root, "0::/kubepods/besteffort/pod"+string(p.UID)+"/"+initID+"\n")
	if c, err := s.Caller(initW.ctx()); err != nil || !slices.Contains(c.Selectors, "k8s:container-name:init") {
		t.Fatalf("init container: %q, %v", c.Selectors, err)
	}

	deletePod(t, bed.Client, p)
	if err := waitChange(t, changes, string(p.UID), c.Recheck); !errors.Is(err, ErrPodGone) || !strings.Contains(err.Error(), ns+"/web-0") {
		t.Fatalf("after the pod was deleted: %v, want ErrPodGone naming it", err)
	}
	// A new connection is now refused: it is still in the pod's cgroup.
	if c, err := s.Caller(w.ctx()); err == nil || !strings.Contains(err.Error(), "no pod on node") {
		t.Fatalf("caller of a deleted pod: %q, %v", c.Selectors, err)
	}
}

// A container that leaves the pod's status (it restarted under a new ID)
// takes its callers' identity with it; its sibling keeps its own.
func TestContainerLeavingStatusEndsIdentity(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "leave")
	root := t.TempDir()
	app, envoy := newID(t, 1), newID(t, 2)
	p := createPod(t, bed.Client, ns, "web-1", "default", node.Name)
	p = setStatus(t, bed.Client, p, app, envoy, "")
	a, changes := startAttestor(t, bed, node.Name, root, 0)
	s := set(t, a)
	appW := startWorkload(t, root, containerdCgroup(string(p.UID), app))
	envoyW := startWorkload(t, root, containerdCgroup(string(p.UID), envoy))
	appC, err := s.Caller(appW.ctx())
	if err != nil {
		t.Fatal(err)
	}
	envoyC, err := s.Caller(envoyW.ctx())
	if err != nil {
		t.Fatal(err)
	}
	setStatus(t, bed.Client, p, newID(t, 4), envoy, "")
	if err := waitChange(t, changes, string(p.UID), appC.Recheck); !errors.Is(err, ErrPodGone) {
		t.Fatalf("the restarted container's old process: %v, want ErrPodGone", err)
	}
	if err := envoyC.Recheck(); err != nil {
		t.Fatalf("its sibling: %v", err)
	}
}

// A process whose container the informer does not know yet waits for it
// (the kubelet reports it a moment after the container starts), woken by
// the informer, not by polling; one that never appears is refused with a
// reason once Wait is up.
func TestContainerNotYetInStatus(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "late")
	root := t.TempDir()
	app := newID(t, 1)
	p := createPod(t, bed.Client, ns, "web-2", "default", node.Name)
	a, _ := startAttestor(t, bed, node.Name, root, waitLong)
	s := set(t, a)
	w := startWorkload(t, root, containerdCgroup(string(p.UID), app))

	type result struct {
		sels []string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := s.Caller(w.ctx())
		done <- result{c.Selectors, err}
	}()
	// Once the caller waits (the attestor has no pod for it), the kubelet
	// reports the container.
	for deadline := time.Now().Add(waitLong); ; {
		a.mu.Lock()
		n := a.waiting
		a.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the caller never waited for its container")
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	setStatus(t, bed.Client, p, app, "", "")
	r := <-done
	if r.err != nil || !slices.Contains(r.sels, "k8s:pod-name:web-2") {
		t.Fatalf("late container: %q, %v", r.sels, r.err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("woken %s after the status arrived", d)
	}

	short := 300 * time.Millisecond
	b, _ := startAttestor(t, bed, node.Name, root, short)
	missing := startWorkload(t, root, containerdCgroup(string(p.UID), newID(t, 9)))
	start = time.Now()
	c, err := set(t, b).Caller(missing.ctx())
	if err == nil || !strings.Contains(err.Error(), "no pod on node "+node.Name+" reports after 300ms") {
		t.Fatalf("container never reported: %q, %v", c.Selectors, err)
	}
	if d := time.Since(start); d < short {
		t.Fatalf("refused after %s, before Wait (%s)", d, short)
	}
}

// A process outside any pod gets no k8s selector but is not refused: the
// unix attestor's selectors still serve it. Nor does a pod's container on
// another node, or an untracked caller, get any.
func TestOutsidePodFallsBack(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "host")
	other := bed.Node(t, "other")
	root := t.TempDir()
	a, _ := startAttestor(t, bed, node.Name, root, 200*time.Millisecond)
	s := set(t, a)
	for _, cg := range []string{
		"0::/system.slice/sshd.service\n",
		"0::/system.slice/docker-" + newID(t, 1) + ".scope\n",
		"0::/kubepods.slice/kubepods-besteffort.slice\n",
	} {
		w := startWorkload(t, root, cg)
		c, err := s.Caller(w.ctx())
		if err != nil {
			t.Fatalf("%q: %v", cg, err)
		}
		if slices.ContainsFunc(c.Selectors, func(s string) bool { return strings.HasPrefix(s, "k8s:") }) || !slices.Contains(c.Selectors, "unix:uid:"+strconv.Itoa(os.Getuid())) {
			t.Fatalf("%q: selectors %q, want the unix ones only", cg, c.Selectors)
		}
	}

	// A pod bound to another node is not watched here: its container is
	// no pod of this node's.
	cid := newID(t, 2)
	p := createPod(t, bed.Client, ns, "elsewhere", "default", other.Name)
	setStatus(t, bed.Client, p, cid, "", "")
	w := startWorkload(t, root, containerdCgroup(string(p.UID), cid))
	if c, err := s.Caller(w.ctx()); err == nil {
		t.Fatalf("another node's pod attested here: %q", c.Selectors)
	}

	if sels, check, err := a.AttestRecheck(context.Background(), attest.PeerCred{UID: 0, GID: 0, PID: w.cmd.Process.Pid}); err != nil || sels != nil || check != nil {
		t.Fatalf("untracked caller: %q, %v", sels, err)
	}
}

// The cgroup is read by the caller's pid only; once that process has gone,
// the caller is refused, never taken for what the pid names now.
func TestGoneProcessRefused(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "gone")
	root := t.TempDir()
	app := newID(t, 1)
	p := createPod(t, bed.Client, ns, "web-3", "default", node.Name)
	setStatus(t, bed.Client, p, app, "", "")

	// Its cgroup file (in the test tree) still says the pod: Set.Caller's
	// check of the tracked process refuses it.
	a, _ := startAttestor(t, bed, node.Name, root, 0)
	w := startWorkload(t, root, containerdCgroup(string(p.UID), app))
	w.stop()
	if c, err := set(t, a).Caller(w.ctx()); !errors.Is(err, attest.ErrProcessGone) {
		t.Fatalf("gone process: %q, %v; want ErrProcessGone", c.Selectors, err)
	}
	// In the real procfs its cgroup file has gone with it: refused as
	// gone, not let through as "outside any pod".
	b, _ := startAttestor(t, bed, node.Name, "/proc", 0)
	if sels, _, err := b.AttestRecheck(context.Background(), w.pc); !errors.Is(err, attest.ErrProcessGone) {
		t.Fatalf("gone process, real procfs: %q, %v; want ErrProcessGone", sels, err)
	}
}

// Hostile or broken cgroup files are refused with the reason, and so is a
// container two pods claim, or a cgroup naming another pod than the one
// that runs the container.
func TestRefusals(t *testing.T) {
	bed := k8stest.Shared(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "refuse")
	root := t.TempDir()
	shared, own := newID(t, 1), newID(t, 2)
	p1 := createPod(t, bed.Client, ns, "twin-a", "default", node.Name)
	p2 := createPod(t, bed.Client, ns, "twin-b", "default", node.Name)
	setStatus(t, bed.Client, p1, shared, "", "")
	setStatus(t, bed.Client, p2, shared, own, "")
	a, _ := startAttestor(t, bed, node.Name, root, 200*time.Millisecond)
	s := set(t, a)
	for _, tt := range []struct{ cgroup, want string }{
		{strings.Repeat("0::/x\n", maxCgroupFile/5), "over 65536 bytes"},
		{"not a cgroup file\n", "malformed cgroup line"},
		{"4:memory:/kubepods/besteffort/pod" + string(p2.UID) + "/" + own + "\n0::/kubepods/besteffort/pod" + string(p2.UID) + "/" + shared + "\n", "disagree"},
		{containerdCgroup(string(p1.UID), shared), "claimed by 2 pods"},
		{containerdCgroup(string(p1.UID), own), "its cgroup names pod " + string(p1.UID)},
	} {
		w := startWorkload(t, root, tt.cgroup)
		if c, err := s.Caller(w.ctx()); err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "k8s attestor") {
			t.Errorf("cgroup %.60q: %q, %v; want a refusal saying %q", tt.cgroup, c.Selectors, err, tt.want)
		}
	}
}

// An API server that does not answer fails Start within SyncTimeout,
// saying so, and leaves nothing running.
func TestStartFailsClearly(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close() // nothing listens there now
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://" + addr})
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{Client: client, NodeName: "n1", SyncTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "pods of node n1 not listed from the API server within 500ms") || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Start: %v", err)
	}
	a.Close()
	if _, err := New(Config{Client: client}); err == nil {
		t.Fatal("no node name accepted")
	}
}
