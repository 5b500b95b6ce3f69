// Package controlplane is the meshid server, a composition of the parts
// below it: registration entries (entry), the live SVIDs of connected
// callers (svidcache), the CA lifecycle policy (lifecycle), the revocation
// list (revocation), signing (ca) and the store. It adds issuance policy,
// the admin API and the serving of every endpoint.
//
// Its memory is a projection of the store (projection.go): the entry
// index, CA views, JWT keys and revocation list change only as the store's
// watch reports commits, so replicas sharing a store see each other's
// writes, and a write returns once it is applied, so its caller reads it.
// Lifecycle steps run only while the server holds the store's leadership
// (leader.go). Everything it runs outside an RPC belongs to one task group
// (tasks.go) that Close cancels and waits for.
//
// Lock order, outermost first: rotMu (lifecycle steps), revMu
// (revocations), entries.updateMu, pubMu (publishing bundles), mu (CA
// views, JWT keys, revocation list). The projection's watch goroutine
// never takes rotMu, revMu or updateMu, so a write holding one of them may
// wait for the projection (synced).
package controlplane

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/revocation"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
	"github.com/meshid/meshid/svidcache"
)

// Defaults a user gets without flags.
const (
	DefaultTrustDomain = "cluster.local"
	DefaultSVIDTTL     = 24 * time.Hour
	DefaultCATTL       = 365 * 24 * time.Hour
	DefaultCAKeyType   = ca.KeyP256
)

// Config is everything the server needs. Zero values take the defaults.
type Config struct {
	DataDir     string
	TrustDomain string
	SVIDTTL     time.Duration
	CATTL       time.Duration
	CAKeyType   ca.KeyType
	// JWTTTL is the life of JWT-SVIDs; default 5 minutes.
	JWTTTL time.Duration
	// CAPrepareAt and CAActivateAt are the fractions of the active CA's
	// life at which its successor is prepared (published in the bundle)
	// and activated (signing); defaults 1/2 and 2/3.
	CAPrepareAt, CAActivateAt float64
	// CAPrepareWindow is the least time a prepared CA is published before
	// it signs; default 2 x SVIDTTL, never less than SVIDTTL.
	CAPrepareWindow time.Duration
	// CAActivateMinConvergence is the fraction of the connected agents'
	// bundle-carrying streams that must hold the prepared CA before it is
	// activated automatically (convergence.go): 0 means the default 1.0,
	// a negative value turns the gate off.
	CAActivateMinConvergence float64
	// ShortPrepareWindow lifts the SVIDTTL floor of CAPrepareWindow. For
	// meshid dev only: its peers all stream the bundle (none holds a file
	// from a day ago), and a newcomer's "ca prepare" then "ca activate"
	// should work within seconds, not a day.
	ShortPrepareWindow bool
	// RotateSVIDsOnActivation re-issues every served SVID as soon as a new
	// CA is activated, instead of at each one's next renewal.
	RotateSVIDsOnActivation bool
	// SignRate caps signatures per second (0: no cap); SignConcurrency caps
	// signatures in flight (default 4 x GOMAXPROCS); SignQueueTimeout is
	// the longest an admin request queues before ResourceExhausted
	// (default 2s; renewals queue up to 30s).
	SignRate         float64
	SignConcurrency  int
	SignQueueTimeout time.Duration
	// Upstream, if set, signs meshid's CAs as intermediates; the trust
	// bundle is then its root.
	Upstream *ca.Upstream
	// InventoryRetention keeps expired SVIDs in the inventory this long
	// before pruning them (default 7 days).
	InventoryRetention time.Duration
	// DisableAutoRotate turns off the automatic CA lifecycle (manual
	// prepare/activate still work).
	DisableAutoRotate bool
	// CRLValidity is how far ahead a CRL's nextUpdate lies (default 24h,
	// never less than 2 x SVIDTTL); CRLs are re-signed and pushed at half
	// of it. MaxCRLSerials bounds the serials listed on all CRLs together
	// (default DefaultMaxCRLSerials): a revocation past it is refused in
	// favour of an emergency CA rotation.
	CRLValidity   time.Duration
	MaxCRLSerials int
	// KEKFile holds the key that encrypts CA keys at rest; default
	// <DataDir>/kek. It is made (0600) on first start if absent; if it is
	// missing while the store holds sealed CA keys, Open fails instead.
	KEKFile string
	Version string
	Logger  *slog.Logger
	// Now is the clock every expiry decision uses; tests make it fast.
	Now func() time.Time
	// AfterFunc schedules renewals; tests may replace it together with Now.
	// It returns a function that cancels the call.
	AfterFunc func(d time.Duration, f func()) (stop func() bool)
	// Store replaces the bbolt store in DataDir (tests, etcd).
	Store store.Store
	// SharedKEK means replicas share the store and so the KEK: KEKFile
	// must exist, and is never made (each replica making its own would
	// seal CA keys the others cannot open).
	SharedKEK bool
	// AgentSignRate is the most X.509-SVIDs one node agent may have signed
	// per second, sustained (a burst of twice that, at least 2,000, covers a
	// node's whole set after a reconnect): it keeps one agent from filling
	// the inventory. 0: 100/s; negative: no limit.
	AgentSignRate float64
	// FastSign turns on ca.Authority.EnableFastSign for every X.509 CA this
	// server loads or makes: SVIDs skip x509.CreateCertificate's post-sign
	// self-verification (a canary at load, then 1 in 64 checked). Off by
	// default.
	FastSign bool
	// NodeAttestors are the attestation methods agents may use besides
	// the join token (k8s_psat), by their Method.
	NodeAttestors []attest.NodeAttestor
	// DefaultIdentities, if set, gives every pod an identity without an
	// entry (kubernetes.go): an agent on a node may serve
	// spiffe://<td>/ns/<ns>/sa/<sa> for every service account with a pod
	// there, outside ExcludeNamespaces.
	DefaultIdentities NodeWorkloads
	ExcludeNamespaces []string
	// OnBundleChange, if set, is called (without blocking) after the
	// published trust bundle changed; BundlePEM says what it is now.
	OnBundleChange func()
}

// Server holds the live state of a meshid server. Its methods are safe for
// concurrent use.
type Server struct {
	cfg         Config
	td          spiffeid.TrustDomain
	log         *slog.Logger
	store       store.Store
	now         func() time.Time
	startedAt   time.Time
	entries     *entryIndex
	metrics     *Metrics
	sdsMetrics  *sds.Metrics
	grpcMetrics *grpcMetrics
	ids         *svidcache.Cache
	limiter     *signLimiter
	afterFunc   func(time.Duration, func()) func() bool

	kek *kek.KEK

	// tasks owns the watch, the campaign and the timers (tasks.go); proj
	// says how far the watch has been applied (projection.go); leading is
	// true while this server holds the store's leadership, the only time
	// it takes CA lifecycle steps.
	tasks  *tasks
	proj   projection
	leader leaderState
	// agents are the node agents' open Sync streams (agentapi.go);
	// agentLim bounds what one caller of the agent API can cost
	// (agentlimits.go).
	agents   agentHub
	agentLim *agentLimits
	// byParent indexes entries by parent and entryGen counts entry
	// changes, so an agent's Sync walks only its own entries, and only
	// when one changed (agentapi.go).
	byParent                       parentIndex
	entryGen                       atomic.Int64
	rotTimer, maintTimer, pruneTim *timer
	peer                           peerState // the replicas' convergence (peerconv.go)

	// rotMu serialises CA lifecycle steps (manual and automatic).
	rotMu sync.Mutex
	// revMu serialises revocations; revoked is guarded by mu (a value:
	// replaced, never changed in place).
	revMu   sync.Mutex
	revoked revocation.List
	// pubMu serialises publishing bundles; it guards the CRL set
	// (crlset.go), so CRLs are signed outside mu.
	pubMu    sync.Mutex
	lastX509 *identity.Bundle
	lastJWT  *identity.JWTBundle
	crl      crlState
	// maint re-signs CRLs before their nextUpdate and finishes emergency
	// rotations (crlmaint.go).
	maint maintenance
	// ready is true while Run serves; /readyz reports it.
	ready atomic.Bool

	// match says what callers may hold (cache.go); lin knows the entry
	// behind each live certificate (lineage.go); jwtRev refuses JWT-SVIDs
	// of revoked identities (jwtrevoke.go).
	match  matcher
	lin    lineage
	jwtRev jwtRevocations

	mu      sync.RWMutex
	active  *ca.Authority
	jwt     *ca.JWTAuthority
	jwtID   string
	jwtKeys []jwtKeyView
	// activeID is the store ID of the active CA, recorded in the inventory.
	activeID string
	cas      []*caView
}

// Open loads (or, on first start, creates) the server's state: the store,
// the key-encryption key, the CA and the registration entries.
func Open(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = DefaultTrustDomain
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %w", cfg.TrustDomain, err)
	}
	if cfg.SVIDTTL == 0 {
		cfg.SVIDTTL = DefaultSVIDTTL
	}
	if cfg.SVIDTTL < 0 {
		return nil, fmt.Errorf("svid ttl %s: must be positive", cfg.SVIDTTL)
	}
	if cfg.CATTL == 0 {
		cfg.CATTL = DefaultCATTL
	}
	if cfg.CATTL < 2*cfg.SVIDTTL {
		return nil, fmt.Errorf("ca ttl %s must be at least twice the svid ttl %s", cfg.CATTL, cfg.SVIDTTL)
	}
	if cfg.JWTTTL == 0 {
		cfg.JWTTTL = ca.DefaultJWTTTL
	}
	// No upper bound here: a JWT-SVID's expiry is clamped to its signing
	// key's life when it is minted.
	if cfg.JWTTTL < ca.MinJWTSVIDTTL {
		return nil, fmt.Errorf("jwt ttl %s: must be at least %s", cfg.JWTTTL, ca.MinJWTSVIDTTL)
	}
	if cfg.InventoryRetention == 0 {
		cfg.InventoryRetention = DefaultInventoryRetention
	}
	if cfg.SignConcurrency == 0 {
		cfg.SignConcurrency = 4 * runtime.GOMAXPROCS(0)
	}
	if cfg.SignQueueTimeout == 0 {
		cfg.SignQueueTimeout = 2 * time.Second
	}
	if cfg.SignRate < 0 || cfg.SignConcurrency < 0 {
		return nil, fmt.Errorf("sign rate and concurrency must not be negative")
	}
	if cfg.CAPrepareAt == 0 {
		cfg.CAPrepareAt = 0.5
	}
	if cfg.CAActivateAt == 0 {
		cfg.CAActivateAt = 2.0 / 3
	}
	if !(cfg.CAPrepareAt > 0 && cfg.CAPrepareAt < cfg.CAActivateAt && cfg.CAActivateAt < 1) {
		return nil, fmt.Errorf("ca prepare-at %.3f and activate-at %.3f must satisfy 0 < prepare < activate < 1", cfg.CAPrepareAt, cfg.CAActivateAt)
	}
	// The successor must be able to activate (after its publication window)
	// while the active CA can still sign a full SVID: otherwise the CA runs
	// out before rotation and issuance stops.
	window := cfg.CAPrepareWindow
	if window == 0 {
		window = 2 * cfg.SVIDTTL
	}
	if !cfg.ShortPrepareWindow {
		window = max(window, cfg.SVIDTTL)
	}
	if afterPrepare := time.Duration(float64(cfg.CATTL) * (1 - cfg.CAPrepareAt)); afterPrepare <= window+cfg.SVIDTTL {
		return nil, fmt.Errorf("ca ttl %s is too short: after preparing at %.2f of its life it has %s left, which must exceed the publication window %s plus one svid ttl %s",
			cfg.CATTL, cfg.CAPrepareAt, afterPrepare, window, cfg.SVIDTTL)
	}
	if cfg.CAKeyType == "" {
		cfg.CAKeyType = DefaultCAKeyType
	}
	if cfg.CRLValidity < 0 || cfg.MaxCRLSerials < 0 {
		return nil, fmt.Errorf("crl validity %s and max crl serials %d must not be negative", cfg.CRLValidity, cfg.MaxCRLSerials)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.AfterFunc == nil {
		cfg.AfterFunc = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	}
	s := &Server{
		cfg:       cfg,
		td:        td,
		log:       cfg.Logger,
		now:       cfg.Now,
		entries:   newEntryIndex(),
		metrics:   NewMetrics(),
		afterFunc: cfg.AfterFunc,
		limiter:   newSignLimiter(cfg.SignConcurrency, cfg.SignRate, cfg.SignQueueTimeout),
	}
	s.match.srv = s
	s.agentLim = newAgentLimits(cfg.AgentSignRate)
	s.tasks = newTasks(cfg.AfterFunc)
	s.rotTimer = s.tasks.newTimer(s.rotationTick)
	s.maintTimer = s.tasks.newTimer(s.maintenanceTick)
	s.pruneTim = s.tasks.newTimer(s.pruneTick)
	s.peer.kick = make(chan struct{}, 1)
	s.ids = s.newCache()
	s.sdsMetrics = sds.NewMetrics(s.metrics.Registry)
	s.grpcMetrics = newGRPCMetrics(s.metrics.Registry)
	s.metrics.Registry.MustRegister(newStateCollector(s))
	s.metrics.Registry.MustRegister(newConvergenceCollector(s))
	s.startedAt = s.now()

	if cfg.DataDir == "" && cfg.Store == nil {
		return nil, errors.New("data dir is required")
	}
	if cfg.DataDir != "" {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("data dir: %w", err)
		}
	}
	if cfg.KEKFile == "" {
		cfg.KEKFile = filepath.Join(cfg.DataDir, "kek")
	}
	s.store = cfg.Store
	if s.store == nil {
		bs, err := boltstore.Open(filepath.Join(cfg.DataDir, "meshid.db"), boltstore.Options{Logger: s.log, Now: s.now})
		if err != nil {
			return nil, err
		}
		s.store = bs
	}
	// The store is opened first so that a missing KEK file is never replaced
	// by a new key while the store holds CA keys sealed under the old one.
	var k *kek.KEK
	created := false
	if cfg.SharedKEK {
		k, err = kek.Load(cfg.KEKFile)
	} else {
		k, created, err = kek.LoadOrCreateUnlessSealed(cfg.KEKFile, func() (bool, error) { return s.storeHasSealedKeys(ctx) })
	}
	if err != nil {
		s.store.Close()
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	if created {
		s.log.Info("created key-encryption key", "path", cfg.KEKFile)
	}
	s.kek = k
	if err := s.start(ctx); err != nil {
		s.tasks.close()
		s.store.Close()
		return nil, err
	}
	return s, nil
}

// start makes the store ready (bootstrap), builds the projection from it
// and starts what runs in the background: the watch that keeps the
// projection current, the campaign for leadership, and the timers.
func (s *Server) start(ctx context.Context) error {
	lead, err := s.bootstrap(ctx)
	if err != nil {
		return err
	}
	// Serials whose certificates have expired leave the revocation list.
	if _, err := s.store.PruneRevoked(ctx, s.now()); err != nil {
		s.log.Warn("prune revoked serials", "err", err)
	}
	// The revision is read before listing, so that nothing committed
	// between the listing and the watch is missed.
	rev, err := s.store.Revision(ctx)
	if err != nil {
		return fmt.Errorf("read store revision: %w", err)
	}
	if err := s.load(ctx, true); err != nil {
		return err
	}
	s.proj.init(rev)
	if err := s.publishBundles(); err != nil {
		return err
	}
	s.tasks.goFn(func(ctx context.Context) { s.watch(ctx, rev) })
	s.tasks.goFn(func(ctx context.Context) { s.lead(ctx, lead) })
	s.scheduleRotation()
	s.startMaintenance()
	s.pruneInventory(ctx)
	s.pruneTim.reset(pruneInterval)
	if _, ok := s.store.(store.Clustered); ok {
		s.tasks.goFn(s.peerLoop)
	}
	return nil
}

// storeHasSealedKeys reports whether any CA record holds a sealed key.
func (s *Server) storeHasSealedKeys(ctx context.Context) (bool, error) {
	cas, err := s.store.ListCAs(ctx)
	if err != nil {
		return false, err
	}
	for _, rec := range cas {
		if len(rec.SealedKey) > 0 {
			return true, nil
		}
	}
	return false, nil
}

// Close stops renewals and releases the store. Pending inventory writes are
// committed first.
func (s *Server) Close() error {
	// Cancel and wait for the background work first: none of it may
	// touch the cache or the store after they are closed.
	s.tasks.close()
	for _, t := range []*timer{s.rotTimer, s.maintTimer, s.pruneTim} {
		t.cancel()
	}
	s.ids.Close()
	return s.store.Close()
}

// Subscribe returns the caller's live identities and bundles: an SVID (key
// made here, never stored) for each entry its selectors match and each ID
// it holds directly, renewed at half-life and pushed on every change.
func (s *Server) Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error) {
	return s.ids.Subscribe(ctx, caller)
}

// TrustDomain is the server's trust domain.
func (s *Server) TrustDomain() spiffeid.TrustDomain { return s.td }

// Metrics returns the server's Prometheus metrics.
func (s *Server) Metrics() *Metrics { return s.metrics }

// Store returns the server's store (for tools and tests that inspect it).
func (s *Server) Store() store.Store { return s.store }

func parseSigner(der []byte) (crypto.Signer, error) {
	key, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA key of type %T cannot sign", key)
	}
	return signer, nil
}

// publishBundles pushes the current X.509 and JWT bundles to every
// subscriber.
func (s *Server) publishBundles() error {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	jb, err := s.jwtBundle()
	if err != nil {
		return err
	}
	crls, err := s.crls()
	if err != nil {
		return err
	}
	// With an upstream CA that has CAs above it, we cannot sign CRLs for
	// those: peers must check the leaf only, or every chain would fail.
	leafOnly := s.cfg.Upstream != nil && len(s.cfg.Upstream.Chain) > 0
	xb := svidcache.X509Bundle(s.td, s.BundleCerts(), crls, leafOnly)
	s.ids.SetBundles(xb, jb)
	if s.lastX509 == nil || xb.Version != s.lastX509.Version || s.lastJWT == nil || jb.Version != s.lastJWT.Version {
		changed := s.lastX509 == nil || xb.Version != s.lastX509.Version
		s.lastX509, s.lastJWT = xb, jb
		s.agents.wake()
		if f := s.cfg.OnBundleChange; f != nil && changed {
			f()
		}
	}
	s.storeServedCRLs()
	return nil
}
