package k8stest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// pod creates a Pod object bound to node that no kubelet will ever run.
func pod(t *testing.T, c kubernetes.Interface, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p, err := c.CoreV1().Pods(ns).Create(ctxT(t), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: sa,
			Containers:         []corev1.Container{{Name: "app", Image: "example.org/app:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// The node attestor's building block: a token bound to a pod on a node,
// for audience meshid, that TokenReview accepts for that audience only,
// with the pod and node named in its extra fields, and refuses once the pod
// is gone.
func TestBedTokenRequestReview(t *testing.T) {
	bed := Shared(t)
	ctx := ctxT(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "tok-node")
	if _, err := bed.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p := pod(t, bed.Client, ns, "agent-0", "agent", node.Name)

	exp := int64(600)
	tr, err := bed.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{"meshid"},
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest: %v", err)
	}
	review := func(aud string) authenticationv1.TokenReviewStatus {
		t.Helper()
		r, err := bed.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: tr.Status.Token, Audiences: []string{aud}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("TokenReview: %v", err)
		}
		return r.Status
	}

	st := review("meshid")
	if !st.Authenticated {
		t.Fatalf("TokenReview for meshid: not authenticated: %q", st.Error)
	}
	if want := "system:serviceaccount:" + ns + ":agent"; st.User.Username != want {
		t.Errorf("username %q, want %q", st.User.Username, want)
	}
	for k, want := range map[string]string{
		"authentication.kubernetes.io/pod-name":  p.Name,
		"authentication.kubernetes.io/pod-uid":   string(p.UID),
		"authentication.kubernetes.io/node-name": node.Name,
		"authentication.kubernetes.io/node-uid":  string(node.UID),
	} {
		if got := st.User.Extra[k]; len(got) != 1 || got[0] != want {
			t.Errorf("extra %s = %v, want [%s]", k, got, want)
		}
	}
	if st.Audiences[0] != "meshid" {
		t.Errorf("audiences %v", st.Audiences)
	}

	if st := review("kubernetes"); st.Authenticated || !strings.Contains(st.Error, "audience") {
		t.Errorf("TokenReview for another audience: authenticated=%v error=%q, want refused for its audience", st.Authenticated, st.Error)
	}

	zero := int64(0)
	if err := bed.Client.CoreV1().Pods(ns).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	// kube-apiserver caches a successful token authentication for 10 s
	// (its TokenSuccessCacheTTL), so the refusal follows the delete by up
	// to that much; attestors that must refuse a deleted pod at once have
	// to look the pod up themselves.
	deleted := time.Now()
	deadline := deleted.Add(30 * time.Second)
	for {
		st := review("meshid")
		if !st.Authenticated {
			if !strings.Contains(st.Error, "invalidated") && !strings.Contains(st.Error, "not found") {
				t.Errorf("token of a deleted pod refused with %q, want it named invalidated", st.Error)
			}
			t.Logf("token of the deleted pod refused %s after the delete: %s", time.Since(deleted).Round(time.Millisecond), st.Error)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("token of a deleted pod still authenticated after 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Pods stay Pending without a kubelet; their status is what tests patch in
// to stand for a running container.
func TestBedPodStatusPatch(t *testing.T) {
	bed := Shared(t)
	ctx := ctxT(t)
	ns := bed.Namespace(t)
	node := bed.Node(t, "pod-node")
	p := pod(t, bed.Client, ns, "web-0", "default", node.Name)

	cid := "containerd://" + strings.Repeat("ab12", 16)
	patch, _ := json.Marshal(map[string]any{"status": map[string]any{
		"phase":  "Running",
		"podIP":  "10.244.1.5",
		"podIPs": []map[string]string{{"ip": "10.244.1.5"}},
		"containerStatuses": []map[string]any{{
			"name": "app", "image": "example.org/app:1", "imageID": "", "containerID": cid,
			"ready": true, "restartCount": 0, "state": map[string]any{"running": map[string]any{"startedAt": time.Now().UTC().Format(time.RFC3339)}},
		}},
	}})
	if _, err := bed.Client.CoreV1().Pods(ns).Patch(ctx, p.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("patch status: %v", err)
	}
	list, err := bed.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node.Name})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 1 {
		t.Fatalf("pods on %s: %d, want 1", node.Name, len(list.Items))
	}
	got := list.Items[0]
	if got.UID != p.UID || got.Status.Phase != corev1.PodRunning || len(got.Status.ContainerStatuses) != 1 || got.Status.ContainerStatuses[0].ContainerID != cid {
		t.Fatalf("pod after patch: uid %s phase %s statuses %+v", got.UID, got.Status.Phase, got.Status.ContainerStatuses)
	}
	// ServiceAccount admission is on: it mounted the token volume, and it
	// refuses a pod whose service account does not exist.
	var projected bool
	for _, v := range got.Spec.Volumes {
		projected = projected || strings.HasPrefix(v.Name, "kube-api-access-")
	}
	if !projected {
		t.Errorf("no kube-api-access volume: ServiceAccount admission is off? volumes %+v", got.Spec.Volumes)
	}
	_, err = bed.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "orphan"},
		Spec:       corev1.PodSpec{NodeName: node.Name, ServiceAccountName: "nope", Containers: []corev1.Container{{Name: "a", Image: "x"}}},
	}, metav1.CreateOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("pod with a missing service account: err %v, want Forbidden", err)
	}
}

// A server-side dry run validates against the real schemas: a good
// manifest passes and a broken one fails, so the manifest checks built on
// it can fail.
func TestBedKubectlDryRun(t *testing.T) {
	bed := Shared(t)
	ns := bed.Namespace(t)
	dir := t.TempDir()
	const deploy = `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: %s}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: example.org/web:1
        imagePullPolicy: %s
        %s: [{containerPort: 8080}]
`
	run := func(name, pullPolicy, portsField string) (string, error) {
		f := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(f, fmt.Appendf(nil, deploy, ns, pullPolicy, portsField), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.CommandContext(ctxT(t), bed.Kubectl, "--kubeconfig", bed.Kubeconfig, "apply", "--dry-run=server", "-f", f).CombinedOutput()
		return string(out), err
	}
	if out, err := run("good", "IfNotPresent", "ports"); err != nil {
		t.Fatalf("dry run of a good manifest: %v\n%s", err, out)
	}
	out, err := run("bad", "Sometimes", "portz")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("dry run of a broken manifest: err %v, want a non-zero exit\n%s", err, out)
	}
	if !strings.Contains(out, "portz") {
		t.Errorf("kubectl's complaint does not name the unknown field:\n%s", out)
	}
	// A dry run creates nothing.
	if _, err := bed.Client.AppsV1().Deployments(ns).Get(ctxT(t), "web", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("deployment after dry runs: %v, want NotFound", err)
	}
}

// A bed of its own, stopped through its state.json the way `k8sbed down`
// does: both processes are gone afterwards, and were in their own process
// groups so a ^C to make reaches the trap, not the bed.
func TestStartStopLeavesNoProcess(t *testing.T) {
	bin := Shared(t).State.BinDir
	dir := t.TempDir()
	ctx := ctxT(t)
	inst, err := Start(ctx, Options{BinDir: bin, Dir: dir, KillWithParent: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = inst.Stop(context.Background()) })

	st, err := LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Processes) != 2 || st.Processes[0].Name != "kube-apiserver" || st.Processes[1].Name != "etcd" {
		t.Fatalf("processes %+v, want kube-apiserver then etcd", st.Processes)
	}
	for _, p := range st.Processes {
		if !p.alive() {
			t.Fatalf("%s (pid %d) not running after Start", p.Name, p.PID)
		}
		if pg, err := syscall.Getpgid(p.PID); err != nil || pg != p.PID {
			t.Errorf("%s: process group %d (%v), want its own (%d)", p.Name, pg, err, p.PID)
		}
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", st.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	c := kubernetes.NewForConfigOrDie(cfg)
	if _, err := c.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Fatalf("admin kubeconfig against the new bed: %v", err)
	}
	// A second bed in the same directory would fight over etcd's data.
	if _, err := Start(ctx, Options{BinDir: bin, Dir: dir}); err == nil || !strings.Contains(err.Error(), "already holds a bed") {
		t.Errorf("second Start in %s: %v, want refused", dir, err)
	}

	if err := Stop(ctx, dir); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, StateFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state.json after Stop: %v", err)
	}
	// The processes are this test's children: they vanish from /proc once
	// Start's waiters reap them.
	deadline := time.Now().Add(30 * time.Second)
	for _, p := range st.Processes {
		for {
			_, err := os.Stat(fmt.Sprintf("/proc/%d", p.PID))
			if errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s (pid %d) still in /proc after Stop", p.Name, p.PID)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if conn, err := net.DialTimeout("tcp", strings.TrimPrefix(st.APIServer, "https://"), time.Second); err == nil {
		conn.Close()
		t.Errorf("API server port %s still accepts connections after Stop", st.APIServer)
	}
}

// A state.json whose pid now names another process (its start time does
// not match) must not get that process killed; with the right start time
// the same Stop does stop it, so it is the check that spares it.
func TestStopSparesReusedPID(t *testing.T) {
	sleeper := func() (*exec.Cmd, <-chan struct{}) {
		cmd := exec.Command("sleep", "300")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
		return cmd, done
	}
	writeState := func(dir string, pid int, start uint64) {
		t.Helper()
		if err := WriteState(&State{Dir: dir, Processes: []Process{{Name: "kube-apiserver", PID: pid, StartTime: start}}}); err != nil {
			t.Fatal(err)
		}
	}

	cmd, done := sleeper()
	start, err := StartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeState(dir, cmd.Process.Pid, start+1)
	if err := Stop(ctxT(t), dir); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-done:
		t.Fatal("Stop signalled a pid whose start time does not match the state file")
	default:
	}
	if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("sleep gone after Stop: %v", err)
	}

	writeState(dir, cmd.Process.Pid, start)
	if err := Stop(ctxT(t), dir); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Stop with the right start time left the process running")
	}
	if cmd.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Errorf("process ended with %v, want SIGTERM", cmd.ProcessState)
	}
}

func TestUniqueName(t *testing.T) {
	label := regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	for _, in := range []string{"TestX/sub_case#01", strings.Repeat("Long", 40), "---", "", "a--b"} {
		a, b := uniqueName(in, 63), uniqueName(in, 63)
		if len(a) > 63 || !label.MatchString(a) {
			t.Errorf("uniqueName(%q) = %q: not a DNS-1123 label", in, a)
		}
		if a == b {
			t.Errorf("uniqueName(%q) twice gave %q both times", in, a)
		}
	}
	if got := labelValue("TestX/sub case"); got != "TestX_sub_case" {
		t.Errorf("labelValue = %q", got)
	}
}
