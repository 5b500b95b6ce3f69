// Package bundlecm keeps the server's trust bundle in a ConfigMap of its
// own namespace, so the agent DaemonSet can mount it and verify the server
// on first contact (as SPIRE's k8sbundle notifier does). It is a
// one-object controller in client-go's shape: an informer on that
// ConfigMap, a rate-limited workqueue, an idempotent reconcile; a bundle
// change or an edit or deletion of the ConfigMap by anyone else brings it
// back to the bundle.
package bundlecm

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Key is the ConfigMap's data key holding the PEM bundle.
const Key = "bundle.pem"

// ManagedByLabel marks the ConfigMap as meshid's.
const ManagedByLabel = "app.kubernetes.io/managed-by"

// Publisher keeps ConfigMap Namespace/Name equal to Bundle().
type Publisher struct {
	client    kubernetes.Interface
	namespace string
	name      string
	bundle    func() []byte
	log       *slog.Logger

	factory informers.SharedInformerFactory
	synced  cache.InformerSynced
	lister  listersv1.ConfigMapLister
	queue   workqueue.TypedRateLimitingInterface[string]

	mu      sync.Mutex
	lastErr error
}

// New returns a Publisher of bundle (the PEM CA certificates; called on
// every reconcile) into ConfigMap name in namespace.
func New(client kubernetes.Interface, namespace, name string, bundle func() []byte, log *slog.Logger) *Publisher {
	p := &Publisher{client: client, namespace: namespace, name: name, bundle: bundle, log: log,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "meshid-bundle-configmap"})}
	// Only its own ConfigMap is watched: the server needs no right on any
	// other.
	p.factory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	inf := p.factory.Core().V1().ConfigMaps()
	p.lister = inf.Lister()
	p.synced = inf.Informer().HasSynced
	_, _ = inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { p.Kick() },
		UpdateFunc: func(any, any) { p.Kick() },
		DeleteFunc: func(any) { p.Kick() },
	})
	return p
}

// Close stops the queue of a Publisher that will never Run (its start
// failed); Run stops it itself.
func (p *Publisher) Close() { p.queue.ShutDown() }

// Kick asks for a reconcile (the bundle changed); it never blocks.
func (p *Publisher) Kick() { p.queue.Add(p.name) }

// Run reconciles until ctx ends; it returns once its goroutines have.
func (p *Publisher) Run(ctx context.Context) {
	p.factory.Start(ctx.Done())
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		p.queue.ShutDown()
	})
	if cache.WaitForCacheSync(ctx.Done(), p.synced) {
		p.Kick()
		for p.next(ctx) {
		}
	}
	wg.Wait()
	p.factory.Shutdown()
}

func (p *Publisher) next(ctx context.Context) bool {
	key, quit := p.queue.Get()
	if quit {
		return false
	}
	defer p.queue.Done(key)
	err := p.reconcile(ctx)
	p.mu.Lock()
	p.lastErr = err
	p.mu.Unlock()
	if err != nil {
		p.log.Warn("could not publish the trust bundle ConfigMap; retrying", "configmap", p.namespace+"/"+p.name, "err", err)
		p.queue.AddRateLimited(key)
		return true
	}
	p.queue.Forget(key)
	return true
}

// Err is the last reconcile's error (nil once it succeeded).
func (p *Publisher) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// reconcile makes the ConfigMap hold the bundle, changing nothing when it
// already does.
func (p *Publisher) reconcile(ctx context.Context) error {
	want := p.bundle()
	if len(want) == 0 {
		return nil // nothing published yet
	}
	cm, err := p.lister.ConfigMaps(p.namespace).Get(p.name)
	if apierrors.IsNotFound(err) {
		cm := &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.namespace, Labels: map[string]string{ManagedByLabel: "meshid"}},
			Data:       map[string]string{Key: string(want)},
		}
		_, err := p.client.CoreV1().ConfigMaps(p.namespace).Create(ctx, cm, metav1.CreateOptions{FieldManager: "meshid"})
		if apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create configmap: %w (the cache lags; will update)", err)
		}
		if err == nil {
			p.log.Info("trust bundle published", "configmap", p.namespace+"/"+p.name)
		}
		return err
	}
	if err != nil {
		return fmt.Errorf("read configmap from cache: %w", err)
	}
	if bytes.Equal([]byte(cm.Data[Key]), want) {
		return nil
	}
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[Key] = string(want)
	if _, err := p.client.CoreV1().ConfigMaps(p.namespace).Update(ctx, cm, metav1.UpdateOptions{FieldManager: "meshid"}); err != nil {
		return fmt.Errorf("update configmap: %w", err)
	}
	p.log.Info("trust bundle updated", "configmap", p.namespace+"/"+p.name)
	return nil
}
