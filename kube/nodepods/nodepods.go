// Package nodepods keeps, from one watch of every pod, which service
// accounts have pods on which node: what the server needs to give each
// node's agent the default identities (spiffe://<td>/ns/<ns>/sa/<sa>) of
// the pods that run there, and nothing else.
package nodepods

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Index is the service accounts with pods, by node. It implements
// controlplane.NodeWorkloads.
type Index struct {
	log      *slog.Logger
	onChange func(node string)
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer

	mu sync.Mutex
	// pods are what each pod contributes (its node and ns/sa), by
	// namespace/name; nodes count the pods of each ns/sa on a node.
	pods  map[string]podKey
	nodes map[string]*node
}

type podKey struct{ node, sa string }

// node is kept once empty, with its generation: a stream that saw
// generation g must never see g again for another set.
type node struct {
	sas map[string]int // "ns/sa" -> pods
	gen uint64
}

// New returns an Index over client's pods. onChange (which must not block)
// is called with a node's name whenever the service accounts on it
// changed. Run starts it.
func New(client kubernetes.Interface, log *slog.Logger, onChange func(node string)) *Index {
	if onChange == nil {
		onChange = func(string) {}
	}
	x := &Index{log: log, onChange: onChange, pods: map[string]podKey{}, nodes: map[string]*node{}}
	// No resync: the index follows events; a periodic resync would only
	// replay what it holds.
	x.factory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(strip))
	x.informer = x.factory.Core().V1().Pods().Informer()
	_, _ = x.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { x.set(o) },
		UpdateFunc: func(_, o any) { x.set(o) },
		DeleteFunc: x.delete,
	})
	return x
}

// strip keeps of a pod only what the index reads: a cluster's pods are
// held in memory once, and most of a pod is its spec.
func strip(o any) (any, error) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return o, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}

// Run watches until ctx ends, and returns once the informer has stopped.
func (x *Index) Run(ctx context.Context) {
	x.factory.Start(ctx.Done())
	<-ctx.Done()
	x.factory.Shutdown()
}

// WaitSynced waits for the first full list, at most timeout.
func (x *Index) WaitSynced(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !cache.WaitForCacheSync(ctx.Done(), x.informer.HasSynced) {
		return fmt.Errorf("pods not listed from the API server within %s (RBAC: the server needs list and watch on pods)", timeout)
	}
	return nil
}

// ServiceAccounts implements controlplane.NodeWorkloads.
func (x *Index) ServiceAccounts(nodeName string) ([]string, uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.nodes[nodeName]
	if n == nil {
		return nil, 0
	}
	out := make([]string, 0, len(n.sas))
	for sa := range n.sas {
		out = append(out, sa)
	}
	slices.Sort(out)
	return out, n.gen
}

// keyOf is what a pod contributes; ok is false for one that needs no
// identity: not scheduled yet, or finished.
func keyOf(p *corev1.Pod) (podKey, bool) {
	if p.Spec.NodeName == "" || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return podKey{}, false
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return podKey{node: p.Spec.NodeName, sa: p.Namespace + "/" + sa}, true
}

func (x *Index) set(o any) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	k, want := keyOf(p)
	x.update(p.Namespace+"/"+p.Name, k, want)
}

func (x *Index) delete(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	p, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	x.update(p.Namespace+"/"+p.Name, podKey{}, false)
}

// update records that pod name now contributes k (want) or nothing, and
// tells onChange about every node whose service accounts changed.
func (x *Index) update(name string, k podKey, want bool) {
	var changed []string
	x.mu.Lock()
	old, had := x.pods[name]
	if had && (!want || old != k) {
		delete(x.pods, name)
		if n := x.nodes[old.node]; n != nil {
			if n.sas[old.sa]--; n.sas[old.sa] <= 0 {
				delete(n.sas, old.sa)
				n.gen++
				changed = append(changed, old.node)
			}
		}
	}
	if want && (!had || old != k) {
		x.pods[name] = k
		n := x.nodes[k.node]
		if n == nil {
			n = &node{sas: map[string]int{}}
			x.nodes[k.node] = n
		}
		if n.sas[k.sa]++; n.sas[k.sa] == 1 {
			n.gen++
			changed = append(changed, k.node)
		}
	}
	x.mu.Unlock()
	for _, nd := range changed {
		x.onChange(nd)
	}
}
