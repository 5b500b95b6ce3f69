// Package controlplane is the meshid server: who is entitled to which
// identity (registration entries), issuance policy, the admin API, and the
// wiring of the CA and the store.
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
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
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
	// KEKFile holds the key that encrypts CA keys at rest; default
	// <DataDir>/kek. It is made (0600) on first start if absent.
	KEKFile string
	Version string
	Logger  *slog.Logger
	// Now is the clock every expiry decision uses; tests make it fast.
	Now func() time.Time
	// AfterFunc schedules renewals; tests may replace it together with Now.
	// It returns a function that cancels the call.
	AfterFunc func(d time.Duration, f func()) (stop func() bool)
	// Store replaces the bbolt store in DataDir (tests, etcd later).
	Store store.Store
}

// Server holds the live state of a meshid server. Its methods are safe for
// concurrent use.
type Server struct {
	cfg        Config
	td         spiffeid.TrustDomain
	log        *slog.Logger
	store      store.Store
	now        func() time.Time
	startedAt  time.Time
	entries    *entryIndex
	metrics    *Metrics
	sdsMetrics *sds.Metrics
	ids        *identities
	afterFunc  func(time.Duration, func()) func() bool

	kek    *kek.KEK
	tokens tokenBindings

	mu      sync.RWMutex
	active  *ca.Authority
	jwt     *ca.JWTAuthority
	jwtKeys []jwtKeyView
	// activeID is the store ID of the active CA, recorded in the inventory.
	activeID string
	cas      []caView
}

// caView is one CA as the admin API shows it.
type caView struct {
	rec  store.CARecord
	cert *x509.Certificate
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
	if cfg.CAKeyType == "" {
		cfg.CAKeyType = DefaultCAKeyType
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
	}
	s.ids = newIdentities(s)
	s.tokens.conns = map[string]tokenBinding{}
	s.sdsMetrics = sds.NewMetrics(s.metrics.Registry)
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
	k, created, err := kek.LoadOrCreate(cfg.KEKFile)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	if created {
		s.log.Info("created key-encryption key", "path", cfg.KEKFile)
	}
	s.kek = k

	s.store = cfg.Store
	if s.store == nil {
		bs, err := boltstore.Open(filepath.Join(cfg.DataDir, "meshid.db"), boltstore.Options{Logger: s.log, Now: s.now})
		if err != nil {
			return nil, err
		}
		s.store = bs
	}
	if err := s.loadCA(ctx, k); err != nil {
		s.store.Close()
		return nil, err
	}
	if err := s.loadJWT(ctx, k); err != nil {
		s.store.Close()
		return nil, err
	}
	if err := s.loadEntries(ctx); err != nil {
		s.store.Close()
		return nil, err
	}
	if err := s.publishBundles(); err != nil {
		s.store.Close()
		return nil, err
	}
	return s, nil
}

// Close stops renewals and releases the store. Pending inventory writes are
// committed first.
func (s *Server) Close() error {
	s.ids.close()
	return s.store.Close()
}

// Subscribe returns the caller's live identities and bundles: an SVID (key
// made here, never stored) for each entry its selectors match and each ID
// it holds directly, renewed at half-life and pushed on every change.
func (s *Server) Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error) {
	sub, err := s.ids.Subscribe(ctx, caller)
	if err != nil {
		return nil, err
	}
	return sub, nil
}

// TrustDomain is the server's trust domain.
func (s *Server) TrustDomain() spiffeid.TrustDomain { return s.td }

// Metrics returns the server's Prometheus metrics.
func (s *Server) Metrics() *Metrics { return s.metrics }

// Store returns the server's store (for tools and tests that inspect it).
func (s *Server) Store() store.Store { return s.store }

func (s *Server) loadCA(ctx context.Context, k *kek.KEK) error {
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		return fmt.Errorf("load CAs: %w", err)
	}
	var views []caView
	var active *ca.Authority
	var activeID string
	for _, rec := range recs {
		if rec.Kind != "x509" {
			continue
		}
		cert, err := x509.ParseCertificate(rec.CertDER)
		if err != nil {
			return fmt.Errorf("CA %s: parse certificate: %w", rec.ID, err)
		}
		views = append(views, caView{rec: rec, cert: cert})
		if rec.State != store.CAActive {
			continue
		}
		der, err := k.Open(rec.SealedKey, []byte(rec.ID))
		if err != nil {
			return fmt.Errorf("CA %s: unseal key: %w", rec.ID, err)
		}
		key, err := parseSigner(der)
		if err != nil {
			return fmt.Errorf("CA %s: %w", rec.ID, err)
		}
		a, err := ca.LoadAuthority(rec.CertDER, rec.ChainDER, key, s.td)
		if err != nil {
			return fmt.Errorf("CA %s: %w", rec.ID, err)
		}
		if a.TrustDomain != s.td {
			return fmt.Errorf("data dir holds a CA for trust domain %s, not %s", a.TrustDomain, s.td)
		}
		active, activeID = a, rec.ID
	}
	if active == nil {
		a, rec, err := s.newRootCA(k)
		if err != nil {
			return err
		}
		if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
			Time: s.now(), Actor: "server", Action: "ca.create", Target: rec.ID,
			Detail: fmt.Sprintf("self-signed %s root for %s, valid until %s", s.cfg.CAKeyType, s.td, rec.NotAfter.UTC().Format(time.RFC3339)),
		}); err != nil {
			return fmt.Errorf("store new CA: %w", err)
		}
		s.log.Info("created CA", "id", rec.ID, "trust_domain", s.td.String(), "not_after", rec.NotAfter)
		views = append(views, caView{rec: rec, cert: a.Cert})
		active, activeID = a, rec.ID
	}
	s.mu.Lock()
	s.active, s.activeID, s.cas = active, activeID, views
	s.mu.Unlock()
	return nil
}

func (s *Server) newRootCA(k *kek.KEK) (*ca.Authority, store.CARecord, error) {
	now := s.now()
	a, err := ca.NewRoot(s.td, s.cfg.CAKeyType, s.cfg.CATTL, now)
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("create CA: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(a.Key)
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("marshal CA key: %w", err)
	}
	id := ca.Fingerprint(a.Cert)
	// The CA ID is the additional data, so a sealed key cannot be swapped
	// onto another CA record.
	sealed, err := k.Seal(der, []byte(id))
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("seal CA key: %w", err)
	}
	return a, store.CARecord{
		ID:        id,
		Kind:      "x509",
		State:     store.CAActive,
		CertDER:   a.Cert.Raw,
		SealedKey: sealed,
		NotBefore: a.Cert.NotBefore,
		NotAfter:  a.Cert.NotAfter,
		CreatedAt: now,
	}, nil
}

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

func (s *Server) loadEntries(ctx context.Context) error {
	entries, _, err := s.store.ListEntries(ctx, store.EntryQuery{})
	if err != nil {
		return fmt.Errorf("load entries: %w", err)
	}
	for _, e := range entries {
		s.entries.put(e)
	}
	s.log.Debug("loaded entries", "count", len(entries))
	return nil
}

// activeCA returns the signing CA and its store ID.
func (s *Server) activeCA() (*ca.Authority, string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.active, s.activeID
}

// BundleCerts returns the trust anchors of the trust domain: every CA that
// is not yet expired, prepared, active or retired.
func (s *Server) BundleCerts() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	now := s.now()
	var out []*x509.Certificate
	for _, v := range s.cas {
		if now.After(v.cert.NotAfter) {
			continue
		}
		out = append(out, v.cert)
	}
	return out
}

// PrepareCA makes the next CA and publishes it in the trust bundle, pushed
// to every subscriber, without signing with it yet: peers learn to trust it
// before any SVID it signs reaches them.
func (s *Server) PrepareCA(ctx context.Context, actor string) (store.CARecord, error) {
	a, rec, err := s.newRootCA(s.kek)
	if err != nil {
		return store.CARecord{}, err
	}
	rec.State = store.CAPrepared
	if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
		Time: s.now(), Actor: actor, Action: "ca.prepare", Target: rec.ID,
		Detail: fmt.Sprintf("valid until %s", rec.NotAfter.UTC().Format(time.RFC3339)),
	}); err != nil {
		return store.CARecord{}, fmt.Errorf("store prepared CA: %w", err)
	}
	s.mu.Lock()
	s.cas = append(s.cas, caView{rec: rec, cert: a.Cert})
	s.mu.Unlock()
	if err := s.publishBundles(); err != nil {
		return store.CARecord{}, err
	}
	s.log.Info("prepared CA", "id", rec.ID, "not_after", rec.NotAfter, "actor", actor)
	return rec, nil
}

// publishBundles pushes the current X.509 and JWT bundles to every
// subscriber.
func (s *Server) publishBundles() error {
	jb, err := s.jwtBundle()
	if err != nil {
		return err
	}
	s.ids.setBundles(s.td, s.BundleCerts(), jb)
	return nil
}
