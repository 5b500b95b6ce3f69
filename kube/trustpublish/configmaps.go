package trustpublish

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// ConfigMapKey is the data key holding the PEM bundle (as in Istio's
// istio-ca-root-cert).
const ConfigMapKey = "ca.crt"

// ConfigMapsConfig configures a ConfigMaps publisher.
type ConfigMapsConfig struct {
	Client kubernetes.Interface
	// Name is the ConfigMap's name in every namespace.
	Name string
	// Exclude lists namespaces that get no ConfigMap (one meshid made
	// there before is deleted).
	Exclude []string
	// Bundle is the PEM bundle; it is called on every reconcile.
	Bundle func() []byte
	Log    *slog.Logger
	// Workers reconcile namespaces in parallel (default 8), so a bundle
	// change reaches hundreds of namespaces in seconds.
	Workers int
}

// ConfigMaps keeps ConfigMap Name, key ConfigMapKey, equal to the bundle in
// every namespace but the excluded and the terminating ones, creating it in
// namespaces made later and restoring it after an edit or deletion.
type ConfigMaps struct {
	cfg ConfigMapsConfig

	nsFactory, cmFactory informers.SharedInformerFactory
	synced               []cache.InformerSynced
	nsLister             listersv1.NamespaceLister
	cmLister             listersv1.ConfigMapLister
	queue                workqueue.TypedRateLimitingInterface[string]

	mu      sync.Mutex
	lastErr map[string]error // namespace → its last reconcile's error (nil: done)
}

// NewConfigMaps returns the publisher for cfg; Run starts it.
func NewConfigMaps(cfg ConfigMapsConfig) *ConfigMaps {
	if cfg.Workers <= 0 {
		cfg.Workers = 8
	}
	p := &ConfigMaps{cfg: cfg, lastErr: map[string]error{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "meshid-ca-configmaps"})}
	p.nsFactory = informers.NewSharedInformerFactory(cfg.Client, 0)
	// Only ConfigMaps of this name are watched, not every ConfigMap of the
	// cluster.
	p.cmFactory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.Name).String()
		}))
	ns := p.nsFactory.Core().V1().Namespaces()
	cm := p.cmFactory.Core().V1().ConfigMaps()
	p.nsLister, p.cmLister = ns.Lister(), cm.Lister()
	p.synced = []cache.InformerSynced{ns.Informer().HasSynced, cm.Informer().HasSynced}
	_, _ = ns.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) { p.enqueue(o) },
		UpdateFunc: func(old, cur any) {
			// Only what reconcile looks at: the phase.
			if o, ok := old.(*corev1.Namespace); ok {
				if c, ok := cur.(*corev1.Namespace); ok && o.Status.Phase == c.Status.Phase {
					return
				}
			}
			p.enqueue(cur)
		},
	})
	_, _ = cm.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { p.enqueue(o) },
		UpdateFunc: func(_, o any) { p.enqueue(o) },
		DeleteFunc: func(o any) { p.enqueue(o) },
	})
	return p
}

func (p *ConfigMaps) enqueue(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	switch v := o.(type) {
	case *corev1.Namespace:
		p.queue.Add(v.Name)
	case *corev1.ConfigMap:
		p.queue.Add(v.Namespace)
	}
}

// Kick asks for every namespace to be reconciled (the bundle changed); it
// never blocks.
func (p *ConfigMaps) Kick() {
	all, err := p.nsLister.List(labels.Everything())
	if err != nil {
		return // the cache is not filled yet; Run reconciles all once it is
	}
	for _, ns := range all {
		p.queue.Add(ns.Name)
	}
}

// Err is one of the last reconciles' errors, nil once every namespace
// succeeded.
func (p *ConfigMaps) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for ns, err := range p.lastErr {
		if err != nil {
			return fmt.Errorf("namespace %s: %w", ns, err)
		}
	}
	return nil
}

// Reconciled reports whether namespace ns has been reconciled at least
// once, and its last reconcile's error.
func (p *ConfigMaps) Reconciled(ns string) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	err, ok := p.lastErr[ns]
	return ok, err
}

// Run reconciles until ctx ends; it returns once its goroutines have.
func (p *ConfigMaps) Run(ctx context.Context) {
	p.nsFactory.Start(ctx.Done())
	p.cmFactory.Start(ctx.Done())
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		p.queue.ShutDown()
	})
	if cache.WaitForCacheSync(ctx.Done(), p.synced...) {
		p.Kick()
		for range p.cfg.Workers {
			wg.Go(func() {
				for p.next(ctx) {
				}
			})
		}
	}
	wg.Wait()
	p.nsFactory.Shutdown()
	p.cmFactory.Shutdown()
}

func (p *ConfigMaps) next(ctx context.Context) bool {
	ns, quit := p.queue.Get()
	if quit {
		return false
	}
	defer p.queue.Done(ns)
	err := p.reconcile(ctx, ns)
	p.mu.Lock()
	p.lastErr[ns] = err
	p.mu.Unlock()
	if err != nil {
		p.cfg.Log.Warn("could not publish the trust bundle ConfigMap; retrying", "configmap", ns+"/"+p.cfg.Name, "err", err)
		p.queue.AddRateLimited(ns)
		return true
	}
	p.queue.Forget(ns)
	return true
}

// reconcile makes namespace ns's ConfigMap hold the bundle, changing
// nothing when it already does.
func (p *ConfigMaps) reconcile(ctx context.Context, ns string) error {
	want := string(p.cfg.Bundle())
	if want == "" {
		return nil // nothing published yet
	}
	api := p.cfg.Client.CoreV1().ConfigMaps(ns)
	cur, err := p.cmLister.ConfigMaps(ns).Get(p.cfg.Name)
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("read configmap from cache: %w", err)
	}
	if slices.Contains(p.cfg.Exclude, ns) {
		if cur != nil && cur.Labels[ManagedByLabel] == ManagedBy {
			uid := cur.UID
			if err := api.Delete(ctx, p.cfg.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("delete configmap of an excluded namespace: %w", err)
			}
		}
		return nil
	}
	nsObj, err := p.nsLister.Get(ns)
	if apierrors.IsNotFound(err) {
		return nil // gone
	}
	if err != nil {
		return fmt.Errorf("read namespace from cache: %w", err)
	}
	if nsObj.Status.Phase == corev1.NamespaceTerminating || nsObj.DeletionTimestamp != nil {
		return nil // the API server refuses new objects there
	}
	if cur == nil {
		cm := &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: p.cfg.Name, Namespace: ns, Labels: map[string]string{ManagedByLabel: ManagedBy}},
			Data:       map[string]string{ConfigMapKey: want},
		}
		_, err := api.Create(ctx, cm, metav1.CreateOptions{FieldManager: ManagedBy})
		if apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create configmap: %w (the cache lags; will update)", err)
		}
		if err != nil {
			return fmt.Errorf("create configmap: %w", err)
		}
		return nil
	}
	if cur.Data[ConfigMapKey] == want {
		return nil
	}
	cm := cur.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[ConfigMapKey] = want
	if _, err := api.Update(ctx, cm, metav1.UpdateOptions{FieldManager: ManagedBy}); err != nil {
		return fmt.Errorf("update configmap: %w", err)
	}
	return nil
}
