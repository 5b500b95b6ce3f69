package trustpublish

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	certv1 "k8s.io/api/certificates/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/certificates/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// BundlesConfig configures a Bundles publisher.
type BundlesConfig struct {
	Client kubernetes.Interface
	// SignerName links the bundles to the signer (e.g. meshid.io/spiffe);
	// objects are named "<signer with / as :>:<suffix>".
	SignerName string
	// TrustDomain labels the objects (TrustDomainLabel) and scopes which of
	// them this publisher owns.
	TrustDomain string
	// Bundle is the PEM bundle; it is called on every reconcile.
	Bundle func() []byte
	Log    *slog.Logger
}

// Bundles keeps one signer-linked ClusterTrustBundle per CA of the bundle:
// a CA added by a rotation gets its object before a retired one's object is
// deleted, and the kubelet concatenates every object a projection's
// signerName and labelSelector match, so pods see the whole bundle at every
// moment. Objects of other trust domains or other owners are never touched.
type Bundles struct {
	cfg    BundlesConfig
	prefix string // signer name with '/' → ':', plus ':'
	tdPart string // the trust domain's part of each name suffix

	factory informers.SharedInformerFactory
	synced  cache.InformerSynced
	lister  listersv1.ClusterTrustBundleLister
	queue   workqueue.TypedRateLimitingInterface[string]

	mu      sync.Mutex
	lastErr error
}

// NewBundles checks cfg and returns its publisher; Run starts it.
func NewBundles(cfg BundlesConfig) (*Bundles, error) {
	if i := strings.IndexByte(cfg.SignerName, '/'); i <= 0 || i == len(cfg.SignerName)-1 {
		return nil, fmt.Errorf("ClusterTrustBundle signer name %q: want DOMAIN/PATH, e.g. meshid.io/spiffe", cfg.SignerName)
	}
	if errs := validation.IsValidLabelValue(cfg.TrustDomain); len(errs) > 0 || cfg.TrustDomain == "" {
		return nil, fmt.Errorf("trust domain %q cannot label ClusterTrustBundles (%s): a label value is at most 63 characters of [A-Za-z0-9._-]", cfg.TrustDomain, strings.Join(errs, "; "))
	}
	b := &Bundles{cfg: cfg, prefix: strings.ReplaceAll(cfg.SignerName, "/", ":") + ":"}
	// The suffix must be a DNS subdomain: the trust domain itself reads
	// best in `kubectl get clustertrustbundles`; one that is not (e.g. with
	// '_') stands as a hash.
	b.tdPart = cfg.TrustDomain
	if len(validation.IsDNS1123Subdomain(cfg.TrustDomain)) > 0 {
		sum := sha256.Sum256([]byte(cfg.TrustDomain))
		b.tdPart = "td-" + hex.EncodeToString(sum[:4])
	}
	if n := len(b.Name("0123456789abcdef")); n > validation.DNS1123SubdomainMaxLength {
		return nil, fmt.Errorf("ClusterTrustBundle names for signer %q would be %d characters, above %d", cfg.SignerName, n, validation.DNS1123SubdomainMaxLength)
	}
	// The queue's goroutine is made last: a rejected config leaves none
	// behind (Run stops it).
	b.queue = workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "meshid-cluster-trust-bundles"})
	// Only this signer's bundles are watched; ownership is decided per
	// object by its labels.
	b.factory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.signerName", cfg.SignerName).String()
		}))
	inf := b.factory.Certificates().V1().ClusterTrustBundles()
	b.lister = inf.Lister()
	b.synced = inf.Informer().HasSynced
	_, _ = inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { b.Kick() },
		UpdateFunc: func(any, any) { b.Kick() },
		DeleteFunc: func(any) { b.Kick() },
	})
	return b, nil
}

// Name is the ClusterTrustBundle holding the CA whose hash suffix is
// caHash.
func (b *Bundles) Name(caHash string) string { return b.prefix + b.tdPart + ".ca-" + caHash }

// Labels are the labels of every object the publisher owns: pods select
// them with labelSelector {TrustDomainLabel: <trust domain>}.
func (b *Bundles) Labels() map[string]string {
	return map[string]string{ManagedByLabel: ManagedBy, TrustDomainLabel: b.cfg.TrustDomain}
}

// Kick asks for a reconcile (the bundle changed); it never blocks.
func (b *Bundles) Kick() { b.queue.Add("bundles") }

// Err is the last reconcile's error (nil once it succeeded).
func (b *Bundles) Err() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lastErr
}

// Run reconciles until ctx ends; it returns once its goroutines have.
func (b *Bundles) Run(ctx context.Context) {
	b.factory.Start(ctx.Done())
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		b.queue.ShutDown()
	})
	if cache.WaitForCacheSync(ctx.Done(), b.synced) {
		b.Kick()
		for b.next(ctx) {
		}
	}
	wg.Wait()
	b.factory.Shutdown()
}

func (b *Bundles) next(ctx context.Context) bool {
	key, quit := b.queue.Get()
	if quit {
		return false
	}
	defer b.queue.Done(key)
	err := b.reconcile(ctx)
	b.mu.Lock()
	b.lastErr = err
	b.mu.Unlock()
	if err != nil {
		b.cfg.Log.Warn("could not publish the trust bundle as ClusterTrustBundles; retrying", "signer", b.cfg.SignerName, "err", err)
		b.queue.AddRateLimited(key)
		return true
	}
	b.queue.Forget(key)
	return true
}

func (b *Bundles) owned(o *certv1.ClusterTrustBundle) bool {
	return o.Labels[ManagedByLabel] == ManagedBy && o.Labels[TrustDomainLabel] == b.cfg.TrustDomain
}

// reconcile creates or repairs one object per CA, then deletes this
// publisher's objects whose CA has left the bundle.
func (b *Bundles) reconcile(ctx context.Context) error {
	cas, err := parseBundle(b.cfg.Bundle())
	if err != nil {
		return err
	}
	if len(cas) == 0 {
		return nil // nothing published yet: never delete everything
	}
	api := b.cfg.Client.CertificatesV1().ClusterTrustBundles()
	want := map[string]bool{}
	var errs []error
	for _, c := range cas {
		name := b.Name(c.hash)
		want[name] = true
		cur, err := b.lister.Get(name)
		switch {
		case apierrors.IsNotFound(err):
			obj := &certv1.ClusterTrustBundle{
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: b.Labels()},
				Spec:       certv1.ClusterTrustBundleSpec{SignerName: b.cfg.SignerName, TrustBundle: c.pem},
			}
			if _, err := api.Create(ctx, obj, metav1.CreateOptions{FieldManager: ManagedBy}); err != nil {
				errs = append(errs, fmt.Errorf("create ClusterTrustBundle %s: %w", name, err))
				continue
			}
			b.cfg.Log.Info("trust bundle CA published", "clustertrustbundle", name)
		case err != nil:
			errs = append(errs, fmt.Errorf("read ClusterTrustBundle %s from cache: %w", name, err))
		case cur.Spec.TrustBundle != c.pem || !b.owned(cur):
			// The name holds this CA's hash and this trust domain: an
			// object there is this publisher's, whatever was done to it.
			obj := cur.DeepCopy()
			obj.Spec.TrustBundle = c.pem
			if obj.Labels == nil {
				obj.Labels = map[string]string{}
			}
			for k, v := range b.Labels() {
				obj.Labels[k] = v
			}
			if _, err := api.Update(ctx, obj, metav1.UpdateOptions{FieldManager: ManagedBy}); err != nil {
				errs = append(errs, fmt.Errorf("update ClusterTrustBundle %s: %w", name, err))
				continue
			}
			b.cfg.Log.Info("trust bundle CA repaired", "clustertrustbundle", name)
		}
	}
	if len(errs) > 0 {
		// A retired CA stays published until every current one is.
		return errors.Join(errs...)
	}
	all, err := b.lister.List(labelsOwned(b.cfg.TrustDomain))
	if err != nil {
		return fmt.Errorf("list ClusterTrustBundles from cache: %w", err)
	}
	for _, o := range all {
		if want[o.Name] || !b.owned(o) || !strings.HasPrefix(o.Name, b.prefix) {
			continue
		}
		uid := o.UID
		err := api.Delete(ctx, o.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete retired ClusterTrustBundle %s: %w", o.Name, err))
			continue
		}
		b.cfg.Log.Info("retired CA unpublished", "clustertrustbundle", o.Name)
	}
	return errors.Join(errs...)
}

func labelsOwned(td string) labels.Selector {
	return labels.SelectorFromSet(labels.Set{ManagedByLabel: ManagedBy, TrustDomainLabel: td})
}
