// Package podattest is the node agent's k8s workload attestor: a caller's
// pid, through its cgroup, names a container; a pod informer that watches
// only this node's pods (spec.nodeName), indexed by container ID, names the
// pod that runs it. No kubelet port is needed, and the API server sees one
// watch per node.
//
// What is attested holds only while the pod runs that container: the
// Caller's check (attest.Rechecker) fails once the pod is deleted or the
// container leaves its status, and OnChange tells the agent at once, so it
// ends the caller's streams instead of waiting for their next send.
package podattest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/meshid/meshid/attest"
)

// Defaults of Config.
const (
	DefaultProcRoot    = "/proc"
	DefaultWait        = 2 * time.Second
	DefaultSyncTimeout = 30 * time.Second
)

// ErrPodGone means the pod a caller was attested to was deleted, or no
// longer runs the caller's container: what was attested no longer holds.
var ErrPodGone = errors.New("the caller's pod no longer runs its container")

// Config is what New needs. Client and NodeName are required.
type Config struct {
	// Client reaches the API server; the agent needs get, list and watch
	// on pods.
	Client kubernetes.Interface
	// NodeName is this node's name: only its pods are watched.
	NodeName string
	// ProcRoot is the procfs the callers' cgroups are read from
	// (DefaultProcRoot; the agent needs the host's pid namespace).
	ProcRoot string
	// Wait bounds how long a caller in a pod's cgroup waits for its
	// container to appear in the pod's status (the kubelet reports it a
	// moment after the container starts) before it is refused
	// (DefaultWait).
	Wait time.Duration
	// SyncTimeout bounds Start's wait for the first list (DefaultSyncTimeout).
	SyncTimeout time.Duration
	// OnChange, if set, is called with a pod's UID after the informer has
	// seen it change or go: callers attested to it whose check now fails
	// are to lose their identity. It runs on the informer's goroutine and
	// must not block for long.
	OnChange func(podUID string)
	Logger   *slog.Logger
}

// Attestor is the k8s workload attestor. It implements attest.Attestor and
// attest.Rechecker.
type Attestor struct {
	cfg Config
	log *slog.Logger
	sel string // the field selector: this node's pods
	inf cache.SharedIndexInformer

	// changed is closed (and replaced) whenever the informer adds or
	// updates a pod: a caller waiting for its container waits on it.
	mu      sync.Mutex
	changed chan struct{}
	waiting int // callers waiting for their container (tests watch it)

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// byContainer indexes pods by the IDs of their containers.
const byContainer = "containerID"

// New makes the attestor; Start starts its informer.
func New(cfg Config) (*Attestor, error) {
	if cfg.Client == nil {
		return nil, errors.New("k8s workload attestor: no Kubernetes client")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("k8s workload attestor: the node's name is required")
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = DefaultProcRoot
	}
	if cfg.Wait <= 0 {
		cfg.Wait = DefaultWait
	}
	if cfg.SyncTimeout <= 0 {
		cfg.SyncTimeout = DefaultSyncTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	sel := fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
	a := &Attestor{cfg: cfg, log: cfg.Logger, sel: sel, changed: make(chan struct{})}
	lw := cache.NewFilteredListWatchFromClient(cfg.Client.CoreV1().RESTClient(), "pods", metav1.NamespaceAll,
		func(o *metav1.ListOptions) { o.FieldSelector = sel })
	a.inf = cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, cache.Indexers{byContainer: containerIDs})
	// Managed fields are most of a pod's size and nothing here reads them.
	if err := a.inf.SetTransform(func(obj any) (any, error) {
		if p, ok := obj.(*corev1.Pod); ok {
			p.ManagedFields = nil
		}
		return obj, nil
	}); err != nil {
		return nil, fmt.Errorf("k8s workload attestor: %w", err)
	}
	if _, err := a.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { a.bump() },
		UpdateFunc: func(_, obj any) { a.bump(); a.notify(obj) },
		DeleteFunc: a.notify,
	}); err != nil {
		return nil, fmt.Errorf("k8s workload attestor: %w", err)
	}
	return a, nil
}

// Start runs the informer until Close and waits, at most SyncTimeout, for
// its first list of this node's pods: before it, every pod's caller would
// be refused.
func (a *Attestor) Start(ctx context.Context) error {
	// The informer's own log lines go to our logger, not klog's global.
	ictx, cancel := context.WithCancel(klog.NewContext(context.WithoutCancel(ctx), logr.FromSlogHandler(a.log.Handler())))
	a.cancel = cancel
	a.wg.Go(func() { a.inf.RunWithContext(ictx) })
	wctx, stop := context.WithTimeout(ctx, a.cfg.SyncTimeout)
	defer stop()
	if !cache.WaitForCacheSync(wctx.Done(), a.inf.HasSynced) {
		a.Close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// The informer retries quietly; one list of our own says why.
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := a.cfg.Client.CoreV1().Pods(metav1.NamespaceAll).List(pctx, metav1.ListOptions{FieldSelector: a.sel, Limit: 1})
		if err != nil {
			return fmt.Errorf("pods of node %s not listed from the API server within %s: %w", a.cfg.NodeName, a.cfg.SyncTimeout, err)
		}
		return fmt.Errorf("pods of node %s not listed from the API server within %s (it answers a list now: overloaded?)", a.cfg.NodeName, a.cfg.SyncTimeout)
	}
	a.log.Info("k8s workload attestor: watching this node's pods", "node", a.cfg.NodeName, "pods", len(a.inf.GetStore().ListKeys()))
	return nil
}

// Close stops the informer and waits for it.
func (a *Attestor) Close() {
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
}

// Name implements attest.Attestor.
func (a *Attestor) Name() string { return attest.K8sName }

// Kinds implements attest.Attestor.
func (a *Attestor) Kinds() []attest.Kind { return attest.K8sKinds() }

// Attest implements attest.Attestor.
func (a *Attestor) Attest(ctx context.Context, p attest.PeerCred) ([]string, error) {
	sels, _, err := a.AttestRecheck(ctx, p)
	return sels, err
}

// AttestRecheck implements attest.Rechecker: the k8s selectors of the
// caller's pod and container, and a check that the pod still runs that
// container. A caller outside any pod gets none (the unix attestor's
// still apply); one in a pod's cgroup whose container the informer does
// not know within Wait is refused. A caller whose process is not tracked
// (another pid namespace) gets none: nothing read by its pid could be
// checked to be about it.
func (a *Attestor) AttestRecheck(ctx context.Context, p attest.PeerCred) ([]string, func() error, error) {
	if p.Process() == nil {
		return nil, nil, nil
	}
	b, err := readCgroup(a.cfg.ProcRoot, p.PID)
	if err != nil {
		return nil, nil, err
	}
	cg, err := parseCgroup(b)
	if err != nil {
		return nil, nil, fmt.Errorf("pid %d: %w", p.PID, err)
	}
	if !cg.InPod || cg.ContainerID == "" {
		return nil, nil, nil
	}
	m, err := a.find(ctx, cg.ContainerID)
	if err != nil {
		return nil, nil, err
	}
	if m == nil {
		return nil, nil, fmt.Errorf("pid %d runs in container %s (cgroup %s), which no pod on node %s reports after %s: refused until the kubelet reports it", p.PID, short(cg.ContainerID), truncate(cg.Path), a.cfg.NodeName, a.cfg.Wait)
	}
	if cg.PodUID != "" && cg.PodUID != string(m.pod.UID) {
		return nil, nil, fmt.Errorf("pid %d: its cgroup names pod %s, but container %s is pod %s/%s's (uid %s): refused", p.PID, cg.PodUID, short(cg.ContainerID), m.pod.Namespace, m.pod.Name, m.pod.UID)
	}
	uid, cid, ns, name := m.pod.UID, cg.ContainerID, m.pod.Namespace, m.pod.Name
	check := func() error {
		if a.runs(string(uid), cid) {
			return nil
		}
		return fmt.Errorf("pod %s/%s (uid %s), container %s: %w", ns, name, uid, short(cid), ErrPodGone)
	}
	return selectors(m), check, nil
}

// match is a container and the pod that runs it.
type match struct {
	pod    *corev1.Pod
	status corev1.ContainerStatus
	image  string // the pod spec's image of that container
}

// find returns the pod that runs container cid, waiting at most Wait for
// the informer to learn it; nil if it does not.
func (a *Attestor) find(ctx context.Context, cid string) (*match, error) {
	var timeout <-chan time.Time
	for {
		// The channel before the look-up: a pod added in between closes
		// it, so no update is missed.
		a.mu.Lock()
		changed := a.changed
		a.mu.Unlock()
		m, err := a.lookup(cid)
		if m != nil || err != nil {
			return m, err
		}
		if timeout == nil {
			t := time.NewTimer(a.cfg.Wait)
			defer t.Stop()
			timeout = t.C
			a.mu.Lock()
			a.waiting++
			a.mu.Unlock()
			defer func() {
				a.mu.Lock()
				a.waiting--
				a.mu.Unlock()
			}()
		}
		select {
		case <-changed:
		case <-timeout:
			return nil, nil
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for container %s to appear in a pod: %w", short(cid), ctx.Err())
		}
	}
}

// lookup returns the pod running container cid, nil if none does. Two
// pods claiming one container is refused rather than guessed.
func (a *Attestor) lookup(cid string) (*match, error) {
	objs, err := a.inf.GetIndexer().ByIndex(byContainer, cid)
	if err != nil {
		return nil, fmt.Errorf("pod index: %w", err)
	}
	switch len(objs) {
	case 0:
		return nil, nil
	case 1:
	default:
		return nil, fmt.Errorf("container %s is claimed by %d pods: refused", short(cid), len(objs))
	}
	pod := objs[0].(*corev1.Pod)
	for st := range statuses(pod) {
		if id, ok := containerIDOfStatus(st.ContainerID); ok && id == cid {
			return &match{pod: pod, status: st, image: specImage(pod, st.Name)}, nil
		}
	}
	return nil, nil // the index and the object disagree only across an update
}

// runs reports whether pod uid still runs container cid, as the informer
// knows it.
func (a *Attestor) runs(uid, cid string) bool {
	objs, err := a.inf.GetIndexer().ByIndex(byContainer, cid)
	if err != nil {
		return false
	}
	for _, o := range objs {
		if string(o.(*corev1.Pod).UID) == uid {
			return true
		}
	}
	return false
}

// bump wakes the callers waiting for a container.
func (a *Attestor) bump() {
	a.mu.Lock()
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// notify tells OnChange of a pod updated or deleted.
func (a *Attestor) notify(obj any) {
	if a.cfg.OnChange == nil {
		return
	}
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if p, ok := obj.(*corev1.Pod); ok {
		a.cfg.OnChange(string(p.UID))
	}
}

// selectors are the k8s selectors of a container and its pod, each of a
// kind in attest.K8sKinds.
func selectors(m *match) []string {
	p := m.pod
	out := []string{
		"k8s:ns:" + p.Namespace,
		"k8s:pod-name:" + p.Name,
		"k8s:pod-uid:" + string(p.UID),
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = p.Spec.DeprecatedServiceAccount
	}
	if sa != "" {
		out = append(out, "k8s:sa:"+sa)
	}
	if p.Spec.NodeName != "" {
		out = append(out, "k8s:node-name:"+p.Spec.NodeName)
	}
	out = append(out, "k8s:container-name:"+m.status.Name)
	// The image as the pod names it, and as the runtime resolved it (with
	// its digest), so an entry may pin either.
	var images []string
	for _, img := range []string{m.image, m.status.Image, m.status.ImageID} {
		if img != "" && !slices.Contains(images, img) {
			images = append(images, img)
			out = append(out, "k8s:container-image:"+img)
		}
	}
	keys := make([]string, 0, len(p.Labels))
	for k := range p.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, "k8s:pod-label:"+k+":"+p.Labels[k])
	}
	return out
}

// containerIDs is the index function: the IDs of every container a pod's
// status lists (regular, init and ephemeral).
func containerIDs(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return nil, nil
	}
	var out []string
	for st := range statuses(pod) {
		if id, ok := containerIDOfStatus(st.ContainerID); ok && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out, nil
}

// statuses yields every container status of a pod.
func statuses(pod *corev1.Pod) func(func(corev1.ContainerStatus) bool) {
	return func(yield func(corev1.ContainerStatus) bool) {
		for _, list := range [][]corev1.ContainerStatus{pod.Status.ContainerStatuses, pod.Status.InitContainerStatuses, pod.Status.EphemeralContainerStatuses} {
			for _, st := range list {
				if !yield(st) {
					return
				}
			}
		}
	}
}

// containerIDOfStatus returns the ID in a status's containerID,
// "<runtime>://<id>" ("containerd://", "cri-o://", "docker://").
func containerIDOfStatus(s string) (string, bool) {
	_, id, ok := cutScheme(s)
	if !ok || !isContainerID(id) {
		return "", false
	}
	return id, true
}

func cutScheme(s string) (string, string, bool) {
	for i := 0; i+2 < len(s); i++ {
		if s[i] == ':' {
			if s[i+1] == '/' && s[i+2] == '/' && i > 0 {
				return s[:i], s[i+3:], true
			}
			return "", "", false
		}
	}
	return "", "", false
}

// specImage returns the image the pod's spec gives container name.
func specImage(pod *corev1.Pod, name string) string {
	for _, c := range pod.Spec.Containers {
		if c.Name == name {
			return c.Image
		}
	}
	for _, c := range pod.Spec.InitContainers {
		if c.Name == name {
			return c.Image
		}
	}
	for _, c := range pod.Spec.EphemeralContainers {
		if c.Name == name {
			return c.Image
		}
	}
	return ""
}

// short abbreviates a container ID for messages, as crictl does.
func short(id string) string {
	if len(id) > 13 {
		return id[:13]
	}
	return id
}
