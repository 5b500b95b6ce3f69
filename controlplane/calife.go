package controlplane

import (
	"context"
	"crypto/x509"

	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/kek"
	"github.com/meshid/meshid/store"
)

// caView is one X.509 CA as the server holds it.
type caView struct {
	rec  store.CARecord
	cert *x509.Certificate
	// root is what peers trust for this CA: cert itself, or the upstream
	// root when cert is an intermediate under an upstream CA.
	root *x509.Certificate
	// auth is the loaded signing key, for prepared and active CAs.
	auth *ca.Authority
	// lastNotAfter is the latest NotAfter (unix nanos) of any SVID this CA
	// signed: a retired CA leaves the bundle once that has passed.
	lastNotAfter atomic.Int64
	// dependents counts, for a CA tainted by an emergency rotation, the
	// served SVIDs it still signs for: it leaves the bundle at zero.
	dependents atomic.Int64
	// stateAt is when this server moved the CA to its state (zero if
	// loaded so): a revoked intermediate's revocation time.
	stateAt time.Time
}

// inBundle says whether peers must still trust v at now.
func (v *caView) inBundle(now time.Time) bool {
	if now.After(v.cert.NotAfter) {
		return false
	}
	switch v.rec.State {
	case store.CARevoked:
		return false
	case store.CATainted:
		return v.dependents.Load() > 0 && now.UnixNano() < v.lastNotAfter.Load()
	case store.CARetired:
		return now.UnixNano() < v.lastNotAfter.Load()
	}
	return true
}

func (s *Server) unsealAuthority(k *kek.KEK, rec store.CARecord) (*ca.Authority, error) {
	der, err := k.Open(rec.SealedKey, []byte(rec.ID))
	if err != nil {
		return nil, fmt.Errorf("CA %s: unseal key: %w", rec.ID, err)
	}
	key, err := parseSigner(der)
	if err != nil {
		return nil, fmt.Errorf("CA %s: %w", rec.ID, err)
	}
	a, err := ca.LoadAuthority(rec.CertDER, rec.ChainDER, key, s.td)
	if err != nil {
		return nil, fmt.Errorf("CA %s: %w", rec.ID, err)
	}
	if a.TrustDomain != s.td {
		return nil, fmt.Errorf("data dir holds a CA for trust domain %s, not %s", a.TrustDomain, s.td)
	}
	s.applyFastSign(a)
	return a, nil
}

// loadCA loads every X.509 CA, repairs a rotation a crash interrupted, and
// makes the first CA on first start.
func (s *Server) loadCA(ctx context.Context, k *kek.KEK) error {
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		return fmt.Errorf("load CAs: %w", err)
	}
	var views []*caView
	for _, rec := range recs {
		if rec.Kind != "x509" {
			continue
		}
		cert, err := x509.ParseCertificate(rec.CertDER)
		if err != nil {
			return fmt.Errorf("CA %s: parse certificate: %w", rec.ID, err)
		}
		v := &caView{rec: rec, cert: cert, root: cert}
		if rec.State == store.CATainted {
			// Nothing is served yet after a restart: keep it published
			// until the first recount, when reconnected callers have
			// their SVIDs from the new CA.
			v.dependents.Store(1)
		}
		if n := len(rec.ChainDER); n > 0 {
			if v.root, err = x509.ParseCertificate(rec.ChainDER[n-1]); err != nil {
				return fmt.Errorf("CA %s: parse chain: %w", rec.ID, err)
			}
		}
		// Retired CAs keep their key in memory too: they still sign the
		// CRLs of the certificates they issued.
		if v.auth, err = s.unsealAuthority(k, rec); err != nil {
			return err
		}
		views = append(views, v)
	}
	// Activation writes the new CA as active before retiring the old one,
	// so a crash in between leaves two active CAs: the newer one won.
	var active *caView
	for _, v := range views {
		if v.rec.State == store.CAActive && (active == nil || v.rec.CreatedAt.After(active.rec.CreatedAt)) {
			active = v
		}
	}
	for _, v := range views {
		if v.rec.State == store.CAActive && v != active {
			v.rec.State = store.CARetired
			if err := s.store.PutCA(ctx, v.rec, &store.AuditEvent{Time: s.now(), Actor: "server", Action: "ca.retire",
				Target: v.rec.ID, Detail: "repair: a rotation was interrupted after activating its successor"}); err != nil {
				return fmt.Errorf("repair CA %s: %w", v.rec.ID, err)
			}
			s.log.Warn("finished an interrupted CA rotation", "retired", v.rec.ID, "active", active.rec.ID)
		}
	}
	if active == nil {
		a, rec, err := s.newCA(k, store.CAActive)
		if err != nil {
			return err
		}
		if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
			Time: s.now(), Actor: "server", Action: "ca.create", Target: rec.ID,
			Detail: fmt.Sprintf("%s %s CA for %s, valid until %s", s.cfg.CAKeyType, caKind(rec), s.td, rec.NotAfter.UTC().Format(time.RFC3339)),
		}); err != nil {
			return fmt.Errorf("store new CA: %w", err)
		}
		s.log.Info("created CA", "id", rec.ID, "trust_domain", s.td.String(), "not_after", rec.NotAfter)
		active = &caView{rec: rec, cert: a.Cert, auth: a, root: a.Root()}
		views = append(views, active)
	}
	if err := s.loadLastNotAfter(ctx, views); err != nil {
		return err
	}
	s.mu.Lock()
	s.active, s.activeID, s.cas = active.auth, active.rec.ID, views
	s.mu.Unlock()
	return nil
}

// loadLastNotAfter finds, from the inventory, how long each CA's SVIDs
// live, so retired CAs leave the bundle exactly when they may.
func (s *Server) loadLastNotAfter(ctx context.Context, views []*caView) error {
	rows, _, err := s.store.ListSVIDs(ctx, store.SVIDQuery{NotExpiredAt: s.now()})
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	byID := map[string]*caView{}
	for _, v := range views {
		byID[v.rec.ID] = v
	}
	for _, r := range rows {
		if v := byID[r.CAID]; v != nil && r.NotAfter.UnixNano() > v.lastNotAfter.Load() {
			v.lastNotAfter.Store(r.NotAfter.UnixNano())
		}
	}
	return nil
}

// noteIssued records that caID signed an SVID living until notAfter.
func (s *Server) noteIssued(caID string, notAfter time.Time) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, v := range s.cas {
		if v.rec.ID == caID {
			n := notAfter.UnixNano()
			for {
				old := v.lastNotAfter.Load()
				if n <= old || v.lastNotAfter.CompareAndSwap(old, n) {
					return
				}
			}
		}
	}
}

func (s *Server) newCA(k *kek.KEK, state store.CAState) (*ca.Authority, store.CARecord, error) {
	now := s.now()
	var a *ca.Authority
	var err error
	if up := s.cfg.Upstream; up != nil {
		a, err = ca.NewIntermediate(s.td, s.cfg.CAKeyType, s.cfg.CATTL, now, up)
	} else {
		a, err = ca.NewRoot(s.td, s.cfg.CAKeyType, s.cfg.CATTL, now)
	}
	if err != nil {
		return nil, store.CARecord{}, fmt.Errorf("create CA: %w", err)
	}
	s.applyFastSign(a)
	var chain [][]byte
	for _, c := range a.Chain {
		chain = append(chain, c.Raw)
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
		State:     state,
		CertDER:   a.Cert.Raw,
		ChainDER:  chain,
		SealedKey: sealed,
		NotBefore: a.Cert.NotBefore,
		NotAfter:  a.Cert.NotAfter,
		CreatedAt: now,
	}, nil
}

// activeCA returns the signing CA and its store ID.
func (s *Server) activeCA() (*ca.Authority, string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.active, s.activeID
}

// BundleCerts returns the trust anchors of the trust domain: the prepared
// and active CAs, and retired ones until the last SVID they signed expires.
func (s *Server) BundleCerts() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	now := s.now()
	var out []*x509.Certificate
	for _, v := range s.cas {
		// Intermediates under one upstream share its root: list it once.
		if v.inBundle(now) && !slices.ContainsFunc(out, v.root.Equal) {
			out = append(out, v.root)
		}
	}
	return out
}

// preparedCA returns the prepared CA, if there is one.
func (s *Server) preparedCA() *caView {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, v := range s.cas {
		if v.rec.State == store.CAPrepared {
			return v
		}
	}
	return nil
}

// FailedPreconditionError is a request that is valid but not now; the
// admin API maps it to FailedPrecondition.
type FailedPreconditionError struct{ msg string }

func (e *FailedPreconditionError) Error() string { return e.msg }

// PrepareCA makes the next CA (and JWT key) and publishes it in the trust
// bundle, pushed to every subscriber, without signing with it yet: peers
// learn to trust it before any SVID it signs reaches them.
func (s *Server) PrepareCA(ctx context.Context, actor string) (store.CARecord, error) {
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	return s.prepareLocked(ctx, actor)
}

func (s *Server) prepareLocked(ctx context.Context, actor string) (store.CARecord, error) {
	if p := s.preparedCA(); p != nil {
		return store.CARecord{}, &FailedPreconditionError{msg: fmt.Sprintf("CA %s is already prepared; activate it first", p.rec.ID[:16])}
	}
	// The JWT key first (idempotent): a failure after the CA is stored
	// must not leave a prepared CA without its JWT partner.
	if err := s.prepareJWT(ctx, actor); err != nil {
		return store.CARecord{}, err
	}
	a, rec, err := s.newCA(s.kek, store.CAPrepared)
	if err != nil {
		return store.CARecord{}, err
	}
	if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
		Time: s.now(), Actor: actor, Action: "ca.prepare", Target: rec.ID,
		Detail: fmt.Sprintf("valid until %s", rec.NotAfter.UTC().Format(time.RFC3339)),
	}); err != nil {
		return store.CARecord{}, fmt.Errorf("store prepared CA: %w", err)
	}
	s.mu.Lock()
	s.cas = append(s.cas, &caView{rec: rec, cert: a.Cert, auth: a, root: a.Root()})
	s.mu.Unlock()
	if err := s.publishBundles(); err != nil {
		return store.CARecord{}, err
	}
	s.log.Info("prepared CA: published in the trust bundle", "id", rec.ID, "not_after", rec.NotAfter, "actor", actor)
	s.scheduleRotation()
	return rec, nil
}

// activationSafeAt is when the prepared CA has been in the bundle long
// enough that every renewed peer holds it.
func (s *Server) activationSafeAt(p *caView) time.Time {
	return p.rec.CreatedAt.Add(s.prepareWindow())
}

func (s *Server) prepareWindow() time.Duration {
	w := s.cfg.CAPrepareWindow
	if w == 0 {
		w = 2 * s.cfg.SVIDTTL
	}
	if s.cfg.ShortPrepareWindow {
		return w
	}
	return max(w, s.cfg.SVIDTTL)
}

// ActivateCA makes the prepared CA the signing CA and retires the old one,
// which stays in the bundle until the last SVID it signed expires. Unless
// force, it refuses while the prepared CA is younger than the publication
// window: peers may not hold it yet.
func (s *Server) ActivateCA(ctx context.Context, actor string, force bool) (store.CARecord, error) {
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	return s.activateLocked(ctx, actor, force)
}

func (s *Server) activateLocked(ctx context.Context, actor string, force bool) (store.CARecord, error) {
	p := s.preparedCA()
	if p == nil {
		return store.CARecord{}, &FailedPreconditionError{msg: "no prepared CA: run 'meshid ca prepare' first"}
	}
	now := s.now()
	if safe := s.activationSafeAt(p); !force && now.Before(safe) {
		return store.CARecord{}, &FailedPreconditionError{msg: fmt.Sprintf(
			"the prepared CA has been in the trust bundle for %s; activating before %s (publication window %s) risks peers that do not trust it yet; use --force to override",
			now.Sub(p.rec.CreatedAt).Truncate(time.Second), safe.UTC().Format(time.RFC3339), s.prepareWindow())}
	}
	s.mu.RLock()
	var old *caView
	for _, v := range s.cas {
		if v.rec.ID == s.activeID {
			old = v
		}
	}
	s.mu.RUnlock()

	// New first, then old: a crash between leaves two active CAs, which
	// loadCA resolves in favour of the newer.
	next := p.rec
	next.State = store.CAActive
	if err := s.store.PutCA(ctx, next, &store.AuditEvent{Time: now, Actor: actor, Action: "ca.activate", Target: next.ID}); err != nil {
		return store.CARecord{}, fmt.Errorf("activate CA: %w", err)
	}
	retired := old.rec
	retired.State = store.CARetired
	if err := s.store.PutCA(ctx, retired, &store.AuditEvent{Time: now, Actor: actor, Action: "ca.retire", Target: retired.ID,
		Detail: "stays in the bundle until the last SVID it signed expires"}); err != nil {
		return store.CARecord{}, fmt.Errorf("retire CA: %w", err)
	}
	if err := s.activateJWT(ctx, actor); err != nil {
		return store.CARecord{}, err
	}
	s.mu.Lock()
	nv := &caView{rec: next, cert: p.cert, auth: p.auth, root: p.root}
	rv := &caView{rec: retired, cert: old.cert, root: old.root, auth: old.auth}
	rv.lastNotAfter.Store(old.lastNotAfter.Load())
	s.cas = slices.DeleteFunc(slices.Clone(s.cas), func(v *caView) bool { return v == p || v == old })
	s.cas = append(s.cas, rv, nv)
	slices.SortFunc(s.cas, func(a, b *caView) int { return a.rec.CreatedAt.Compare(b.rec.CreatedAt) })
	s.active, s.activeID = p.auth, next.ID
	s.mu.Unlock()
	if err := s.publishBundles(); err != nil {
		return store.CARecord{}, err
	}
	s.log.Info("activated CA", "id", next.ID, "retired", retired.ID, "actor", actor)
	if s.cfg.RotateSVIDsOnActivation {
		s.ids.RenewAll()
	}
	s.scheduleRotation()
	return next, nil
}

// scheduleRotation arms one timer for the next lifecycle event: preparing
// the next CA at CAPrepareAt of the active CA's life, activating it at
// CAActivateAt (never before the publication window has passed), and a
// retired CA leaving the bundle.
func (s *Server) scheduleRotation() {
	s.rotTimerMu.Lock()
	defer s.rotTimerMu.Unlock()
	if s.rotStop != nil {
		s.rotStop()
		s.rotStop = nil
	}
	if s.closed.Load() || s.cfg.DisableAutoRotate {
		return
	}
	next, ok := s.nextRotationEvent()
	if !ok {
		return
	}
	s.rotStop = s.afterFunc(max(next.Sub(s.now()), 0), s.rotationTick)
}

func (s *Server) lifeFraction(v *caView, f float64) time.Time {
	life := v.cert.NotAfter.Sub(v.rec.CreatedAt)
	return v.rec.CreatedAt.Add(time.Duration(float64(life) * f))
}

func (s *Server) nextRotationEvent() (time.Time, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var active, prepared *caView
	var next time.Time
	consider := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	now := s.now()
	for _, v := range s.cas {
		switch v.rec.State {
		case store.CAActive:
			active = v
		case store.CAPrepared:
			prepared = v
		case store.CARetired:
			if v.inBundle(now) {
				// Leaves the bundle when its last SVID expires: push then.
				consider(time.Unix(0, v.lastNotAfter.Load()).Add(time.Millisecond))
			}
		}
	}
	if t, ok := s.nextRevokedExpiry(); ok {
		consider(t.Add(time.Millisecond))
	}
	for _, v := range s.jwtKeys {
		if v.rec.State == store.CARetired && now.Before(v.rec.NotAfter) {
			consider(v.rec.NotAfter.Add(time.Millisecond))
		}
	}
	if active == nil {
		return time.Time{}, false
	}
	if prepared == nil {
		consider(s.lifeFraction(active, s.cfg.CAPrepareAt))
	} else {
		at := s.lifeFraction(active, s.cfg.CAActivateAt)
		if safe := prepared.rec.CreatedAt.Add(s.prepareWindow()); safe.After(at) {
			at = safe
		}
		consider(at)
	}
	return next, !next.IsZero()
}

// rotationTick runs whatever lifecycle step is due, then re-arms.
func (s *Server) rotationTick() {
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	if s.closed.Load() {
		return
	}
	ctx := context.Background()
	now := s.now()
	s.mu.RLock()
	var active *caView
	for _, v := range s.cas {
		if v.rec.State == store.CAActive {
			active = v
		}
	}
	s.mu.RUnlock()
	prepared := s.preparedCA()
	switch {
	case prepared == nil && active != nil && !now.Before(s.lifeFraction(active, s.cfg.CAPrepareAt)):
		if _, err := s.prepareLocked(ctx, "server"); err != nil {
			s.rotationFailed("prepare", err)
			return
		}
	case prepared != nil && active != nil && !now.Before(s.lifeFraction(active, s.cfg.CAActivateAt)) && !now.Before(s.activationSafeAt(prepared)):
		if _, err := s.activateLocked(ctx, "server", false); err != nil {
			s.rotationFailed("activate", err)
			return
		}
	}
	// A retired CA may have just left the bundle, a revoked serial its CRL.
	if err := s.loadRevoked(ctx); err != nil {
		s.log.Error("reload revoked serials", "err", err)
	}
	if err := s.publishBundles(); err != nil {
		s.log.Error("publish bundles", "err", err)
	}
	s.scheduleRotation()
}

func (s *Server) rotationFailed(step string, err error) {
	s.log.Error("CA rotation step failed; retrying in a minute", "step", step, "err", err)
	s.metrics.RotationFailures.Inc()
	s.rotTimerMu.Lock()
	defer s.rotTimerMu.Unlock()
	if !s.closed.Load() {
		s.rotStop = s.afterFunc(time.Minute, s.rotationTick)
	}
}

func (s *Server) caByID(id string) *caView {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, v := range s.cas {
		if v.rec.ID == id {
			return v
		}
	}
	return nil
}

func caKind(rec store.CARecord) string {
	if len(rec.ChainDER) > 0 {
		return "intermediate (under the upstream CA)"
	}
	return "self-signed root"
}
