// Package pcrsigner is meshid's Kubernetes pod certificate signer
// (KEP-4317): it watches certificates.k8s.io/v1 PodCertificateRequests
// naming its signer and issues each through the server's CA, so pod
// certificates share the inventory, limits, metrics and revocation of
// every other SVID.
//
// A Denied or Failed condition is permanent for the pod (the kubelet never
// retries), so only policy denies, and every other error (store, signing
// limit, API conflicts, a webhook refusing the write) is retried with
// backoff.
package pcrsigner

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	certv1 "k8s.io/api/certificates/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/certificates/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshid/meshid/controlplane"
)

// DefaultSignerName is meshid's signer name.
const DefaultSignerName = "meshid.io/spiffe"

// ReasonNamespaceNotAllowed denies a request from a namespace that
// --pcr-allow-namespace / --pcr-exclude-namespace keep out.
const ReasonNamespaceNotAllowed = "NamespaceNotAllowed"

// AcceptedKeyTypes are the podCertificate keyTypes meshid signs (the CA's
// subject key checks: ECDSA P-256/P-384, RSA 2048-8192, Ed25519).
var AcceptedKeyTypes = []string{"ECDSAP256", "ECDSAP384", "RSA3072", "RSA4096", "ED25519"}

// Config configures a Signer.
type Config struct {
	Client     kubernetes.Interface
	SignerName string
	// Sign issues the certificate (controlplane.Server.SignPodCertificate).
	Sign func(context.Context, controlplane.PodCertRequest) (*controlplane.PodCert, error)
	// AllowNamespaces, when not empty, are the only namespaces served;
	// ExcludeNamespaces are never served.
	AllowNamespaces, ExcludeNamespaces []string
	// Leading reports whether this replica signs (nil: always); the others
	// keep their cache warm and leave requests to the leader.
	Leading func() bool
	// Registerer gets meshid_pcr_queue_depth and meshid_pcr_issue_seconds
	// while Run runs (nil: none).
	Registerer prometheus.Registerer
	Log        *slog.Logger
	// Workers sign and write in parallel (default 32: a status write is a
	// round trip, signing is bounded by the server's limiter); MaxQueue bounds the queue
	// (default 20000).
	Workers, MaxQueue int
	// UpdateStatus writes a PCR's status (nil: the client's UpdateStatus);
	// a seam for tests that make the API refuse writes.
	UpdateStatus func(context.Context, *certv1.PodCertificateRequest) (*certv1.PodCertificateRequest, error)
	// Resync re-offers every cached request (default 1 min), which brings
	// back any the bounded queue had to drop.
	Resync time.Duration
}

// Signer is a running pod certificate signer.
type Signer struct {
	cfg     Config
	log     *slog.Logger
	factory informers.SharedInformerFactory
	synced  cache.InformerSynced
	lister  listersv1.PodCertificateRequestLister
	queue   *fairQueue
	backoff workqueue.TypedRateLimiter[string]

	depth   prometheus.GaugeFunc
	latency prometheus.Histogram

	mu      sync.Mutex
	first   map[string]time.Time             // key -> when first seen (latency)
	pending map[string]*controlplane.PodCert // uid -> signed, not yet written
	written map[string]time.Time             // uid -> status written (cache lag)
}

// New checks cfg and returns a Signer; Run starts it.
func New(cfg Config) (*Signer, error) {
	if err := CheckSignerName(cfg.SignerName); err != nil {
		return nil, err
	}
	if cfg.Client == nil || cfg.Sign == nil {
		return nil, errors.New("pod certificate signer: Client and Sign are required")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 32
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = 20000
	}
	if cfg.Resync <= 0 {
		cfg.Resync = time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.UpdateStatus == nil {
		c := cfg.Client
		cfg.UpdateStatus = func(ctx context.Context, p *certv1.PodCertificateRequest) (*certv1.PodCertificateRequest, error) {
			return c.CertificatesV1().PodCertificateRequests(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{FieldManager: "meshid"})
		}
	}
	s := &Signer{cfg: cfg, log: cfg.Log, queue: newFairQueue(cfg.MaxQueue),
		// Capped well inside the 15 min after which kube-controller-manager
		// deletes a request.
		backoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
		first:   map[string]time.Time{}, pending: map[string]*controlplane.PodCert{}, written: map[string]time.Time{}}
	s.factory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.signerName", cfg.SignerName).String()
		}))
	inf := s.factory.Certificates().V1().PodCertificateRequests()
	s.lister = inf.Lister()
	s.synced = inf.Informer().HasSynced
	_, _ = inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.offer,
		UpdateFunc: func(_, o any) { s.offer(o) },
		DeleteFunc: func(o any) {
			if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = d.Obj
			}
			if p, ok := o.(*certv1.PodCertificateRequest); ok {
				s.forget(p.Namespace+"/"+p.Name, string(p.UID))
			}
		},
	})
	s.depth = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshid_pcr_queue_depth",
		Help: "PodCertificateRequests waiting to be signed."}, func() float64 { return float64(s.queue.Len()) })
	s.latency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshid_pcr_issue_seconds",
		Help:    "Time from the signer seeing a PodCertificateRequest to its Issued status being written.",
		Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300}})
	return s, nil
}

// CheckSignerName refuses names that are not DOMAIN/PATH and the ones
// Kubernetes reserves (kubernetes.io and its subdomains).
func CheckSignerName(name string) error {
	domain, path, ok := strings.Cut(name, "/")
	if !ok || domain == "" || path == "" || !strings.Contains(domain, ".") {
		return fmt.Errorf("signer name %q: want DOMAIN/NAME, e.g. %s", name, DefaultSignerName)
	}
	if domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io") {
		return fmt.Errorf("signer name %q: kubernetes.io signer names are reserved for Kubernetes", name)
	}
	return nil
}

// terminal reports whether p has its one permanent condition.
func terminal(p *certv1.PodCertificateRequest) bool {
	for _, c := range p.Status.Conditions {
		switch c.Type {
		case certv1.PodCertificateRequestConditionTypeIssued, certv1.PodCertificateRequestConditionTypeDenied, certv1.PodCertificateRequestConditionTypeFailed:
			return true
		}
	}
	return false
}

func (s *Signer) offer(o any) {
	p, ok := o.(*certv1.PodCertificateRequest)
	if !ok || terminal(p) {
		return
	}
	key := p.Namespace + "/" + p.Name
	s.mu.Lock()
	if _, ok := s.first[key]; !ok {
		s.first[key] = time.Now()
	}
	s.mu.Unlock()
	if !s.queue.Add(key, string(p.Spec.NodeName)) {
		s.log.Warn("pod certificate queue full; the request waits for the next resync", "pcr", key, "max", s.cfg.MaxQueue)
	}
}

func (s *Signer) forget(key, uid string) {
	s.backoff.Forget(key)
	s.mu.Lock()
	delete(s.first, key)
	delete(s.pending, uid)
	s.mu.Unlock()
}

// Run signs until ctx ends; it returns once its goroutines have, after
// the requests in hand are finished (so a restart never signs one twice).
func (s *Signer) Run(ctx context.Context) {
	if r := s.cfg.Registerer; r != nil {
		for _, c := range []prometheus.Collector{s.depth, s.latency} {
			if err := r.Register(c); err != nil {
				s.log.Warn("pod certificate metrics not registered", "err", err)
			}
			defer r.Unregister(c)
		}
	}
	s.factory.Start(ctx.Done())
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		s.queue.ShutDown()
	})
	if cache.WaitForCacheSync(ctx.Done(), s.synced) {
		s.log.Info("pod certificate signer running", "signer", s.cfg.SignerName)
		for range s.cfg.Workers {
			wg.Go(func() {
				for s.next(ctx) {
				}
			})
		}
	}
	wg.Wait()
	s.factory.Shutdown()
}

func (s *Signer) next(ctx context.Context) bool {
	key, ok := s.queue.Get()
	if !ok {
		return false
	}
	defer s.queue.Done(key)
	// The request in hand is finished even when ctx ends: a certificate
	// signed and not written would be signed again by the next leader.
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	retry, node, err := s.process(ictx, key)
	switch {
	case err != nil:
		d := s.backoff.When(key)
		s.log.Warn("pod certificate not issued yet; retrying", "pcr", key, "in", d, "err", err)
		s.queue.AddAfter(key, node, d)
	case retry > 0:
		s.queue.AddAfter(key, node, retry)
	}
	return true
}

// process handles one request; it returns a delay to look again (not
// leading), or an error to retry with backoff.
func (s *Signer) process(ctx context.Context, key string) (time.Duration, string, error) {
	ns, name, _ := strings.Cut(key, "/")
	p, err := s.lister.PodCertificateRequests(ns).Get(name)
	if apierrors.IsNotFound(err) {
		s.forget(key, "")
		return 0, "", nil
	}
	if err != nil {
		return 0, "", fmt.Errorf("read from cache: %w", err)
	}
	node := string(p.Spec.NodeName)
	uid := string(p.UID)
	if terminal(p) || s.wasWritten(uid) {
		s.forget(key, uid)
		return 0, node, nil
	}
	if s.cfg.Leading != nil && !s.cfg.Leading() {
		return notLeadingRetry, node, nil
	}
	for attempt := 0; ; attempt++ {
		status, denied := s.decide(ctx, p)
		if status == nil {
			return 0, node, denied
		}
		q := p.DeepCopy()
		q.Status = *status
		_, err := s.cfg.UpdateStatus(ctx, q)
		if err == nil {
			s.done(key, uid, status)
			return 0, node, nil
		}
		if !apierrors.IsConflict(err) || attempt > 0 {
			return 0, node, fmt.Errorf("write status: %w", err)
		}
		// The cache lags: read the request from the API server and try
		// again with the same certificate.
		p, err = s.cfg.Client.CertificatesV1().PodCertificateRequests(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			s.forget(key, uid)
			return 0, node, nil
		}
		if err != nil {
			return 0, node, fmt.Errorf("read after a conflict: %w", err)
		}
		if terminal(p) {
			s.forget(key, uid)
			return 0, node, nil
		}
	}
}

func (s *Signer) wasWritten(uid string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for u, at := range s.written {
		// Past the cleaner's 15 min the request is gone anyway.
		if now.Sub(at) > 20*time.Minute {
			delete(s.written, u)
		}
	}
	_, ok := s.written[uid]
	return ok
}

func (s *Signer) done(key, uid string, st *certv1.PodCertificateRequestStatus) {
	s.mu.Lock()
	first, ok := s.first[key]
	s.written[uid] = time.Now()
	s.mu.Unlock()
	issued := st.CertificateChain != ""
	if ok && issued {
		s.latency.Observe(time.Since(first).Seconds())
	}
	s.forget(key, uid)
	if issued {
		s.log.Debug("pod certificate issued", "pcr", key)
	} else {
		s.log.Info("pod certificate request denied", "pcr", key, "reason", st.Conditions[0].Reason, "message", st.Conditions[0].Message)
	}
}

// decide is the status to write: Issued with a certificate, or Denied for
// policy; nil and an error when signing failed (transient).
func (s *Signer) decide(ctx context.Context, p *certv1.PodCertificateRequest) (*certv1.PodCertificateRequestStatus, error) {
	now := time.Now()
	cond := func(typ, reason, msg string) *certv1.PodCertificateRequestStatus {
		return &certv1.PodCertificateRequestStatus{Conditions: []metav1.Condition{{
			Type: typ, Status: metav1.ConditionTrue, Reason: reason, Message: msg,
			LastTransitionTime: metav1.NewTime(now), ObservedGeneration: p.Generation,
		}}}
	}
	deny := func(reason, msg string) (*certv1.PodCertificateRequestStatus, error) {
		return cond(certv1.PodCertificateRequestConditionTypeDenied, reason, msg), nil
	}
	if (len(s.cfg.AllowNamespaces) > 0 && !slices.Contains(s.cfg.AllowNamespaces, p.Namespace)) || slices.Contains(s.cfg.ExcludeNamespaces, p.Namespace) {
		return deny(ReasonNamespaceNotAllowed, fmt.Sprintf("meshid does not issue pod certificates in namespace %s", p.Namespace))
	}
	if len(p.Spec.UnverifiedUserAnnotations) > 0 {
		keys := make([]string, 0, len(p.Spec.UnverifiedUserAnnotations))
		for k := range p.Spec.UnverifiedUserAnnotations {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		return deny(certv1.PodCertificateRequestConditionInvalidUserConfig,
			fmt.Sprintf("meshid knows no userAnnotations; got %s", strings.Join(keys, ", ")))
	}
	var pub any
	if len(p.Spec.StubPKCS10Request) == 0 {
		// A 1.35 kubelet fills only v1beta1's pkixPublicKey (its proof of
		// possession checked by the API server at creation), which v1
		// does not show: read the same object through v1beta1.
		beta, err := s.cfg.Client.CertificatesV1beta1().PodCertificateRequests(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("no stubPKCS10Request; read pkixPublicKey through v1beta1: %w", err)
		}
		if pub, err = x509.ParsePKIXPublicKey(beta.Spec.PKIXPublicKey); err != nil {
			return deny(certv1.PodCertificateRequestConditionUnsupportedKeyType,
				fmt.Sprintf("neither stubPKCS10Request nor a pkixPublicKey meshid can read (%v); meshid signs keyType %s", err, strings.Join(AcceptedKeyTypes, ", ")))
		}
	} else {
		csr, err := x509.ParseCertificateRequest(p.Spec.StubPKCS10Request)
		if err != nil || csr.CheckSignature() != nil {
			// Only the API server's own checks could have let this in; it
			// can never succeed, so the pod is better told than left
			// waiting.
			return deny(certv1.PodCertificateRequestConditionUnsupportedKeyType,
				fmt.Sprintf("stubPKCS10Request is not a signed PKCS#10 request meshid can read; meshid signs keyType %s", strings.Join(AcceptedKeyTypes, ", ")))
		}
		pub = csr.PublicKey
	}
	if kt := keyType(pub); !slices.Contains(AcceptedKeyTypes, kt) && !strings.HasPrefix(kt, "RSA") {
		return deny(certv1.PodCertificateRequestConditionUnsupportedKeyType,
			fmt.Sprintf("meshid does not sign %s keys; use keyType %s", kt, strings.Join(AcceptedKeyTypes, ", ")))
	} else if kt == "RSA<2048" {
		return deny(certv1.PodCertificateRequestConditionUnsupportedKeyType,
			fmt.Sprintf("meshid does not sign RSA keys under 2048 bits; use keyType %s", strings.Join(AcceptedKeyTypes, ", ")))
	}

	uid := string(p.UID)
	s.mu.Lock()
	pc := s.pending[uid]
	s.mu.Unlock()
	// The API server wants notBefore within 5 min of now: a certificate
	// signed for an earlier attempt is reused only while it is fresh.
	if pc == nil || now.Sub(pc.NotBefore) > 3*time.Minute {
		maxLife := time.Duration(0)
		if m := p.Spec.MaxExpirationSeconds; m != nil {
			maxLife = time.Duration(*m) * time.Second
		}
		var err error
		pc, err = s.cfg.Sign(ctx, controlplane.PodCertRequest{
			Namespace: p.Namespace, ServiceAccount: p.Spec.ServiceAccountName,
			PodName: p.Spec.PodName, PodUID: string(p.Spec.PodUID),
			NodeName: string(p.Spec.NodeName), NodeUID: string(p.Spec.NodeUID),
			PublicKey: pub, MaxLifetime: maxLife,
		})
		if err != nil {
			return nil, fmt.Errorf("sign: %w", err)
		}
		s.mu.Lock()
		s.pending[uid] = pc
		s.mu.Unlock()
	}
	var chain strings.Builder
	for _, der := range pc.ChainDER {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	st := cond(certv1.PodCertificateRequestConditionTypeIssued, "Issued", fmt.Sprintf("%s serial %s", pc.SpiffeID, pc.Serial))
	st.CertificateChain = chain.String()
	nb, na := metav1.NewTime(pc.NotBefore), metav1.NewTime(pc.NotAfter)
	br := metav1.NewTime(RefreshAt(pc.NotBefore, pc.NotAfter, rand.Float64()))
	st.NotBefore, st.NotAfter, st.BeginRefreshAt = &nb, &na, &br
	return st, nil
}

// RefreshAt is the beginRefreshAt for a certificate valid from nb to na:
// half-life, moved by up to ±10 % of the lifetime by r in [0,1) so that a
// node's pods, issued together, do not all come back together; always
// within [nb+10m, na-10m] as the API server requires.
func RefreshAt(nb, na time.Time, r float64) time.Time {
	life := na.Sub(nb)
	at := nb.Add(life/2 + time.Duration((r-0.5)*0.2*float64(life)))
	lo, hi := nb.Add(10*time.Minute), na.Add(-10*time.Minute)
	if at.Before(lo) {
		at = lo
	}
	if at.After(hi) {
		at = hi
	}
	return at.Truncate(time.Second)
}

// keyType names a public key as the podCertificate keyType does.
func keyType(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return "ECDSAP256"
		case elliptic.P384():
			return "ECDSAP384"
		case elliptic.P521():
			return "ECDSAP521"
		}
		return "ECDSA"
	case *rsa.PublicKey:
		if b := k.N.BitLen(); b < 2048 {
			return "RSA<2048"
		} else {
			return fmt.Sprintf("RSA%d", b)
		}
	case ed25519.PublicKey:
		return "ED25519"
	}
	return fmt.Sprintf("%T", pub)
}

// notLeadingRetry is how often a replica that does not lead looks at a
// request again: the new leader after a failover starts within it.
const notLeadingRetry = 2 * time.Second
