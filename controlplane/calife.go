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
	"github.com/meshid/meshid/lifecycle"
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
	// dependents counts, for a CA tainted by an emergency rotation, the
	// served SVIDs it still signs for: it leaves the bundle at zero. Both
	// are shared by every view of one CA (views are replaced, not
	// mutated, when its record changes), so a mint finishing on an older
	// view is not lost.
	lastNotAfter, dependents *atomic.Int64
	// stateAt is when this server moved the CA to its state (zero if
	// loaded so): a revoked intermediate's revocation time.
	stateAt time.Time
}

// lc is v as the lifecycle policy sees it.
func (v *caView) lc() lifecycle.CA {
	c := lifecycle.CA{ID: v.rec.ID, State: v.rec.State, CreatedAt: v.rec.CreatedAt, NotAfter: v.cert.NotAfter,
		Dependents: v.dependents.Load()}
	if n := v.lastNotAfter.Load(); n != 0 {
		c.LastNotAfter = time.Unix(0, n)
	}
	return c
}

// inBundle says whether peers must still trust v at now.
func (v *caView) inBundle(now time.Time) bool { return lifecycle.InBundle(now, v.lc()) }

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

// loadLastNotAfter finds, from the inventory, how long each CA's SVIDs
// live, so retired CAs leave the bundle exactly when they may. The store
// keeps the latest NotAfter per CA beside the rows: decoding every live
// row for it was most of a start-up against a large inventory. A value
// already past is not kept, as a row already expired was not before.
func (s *Server) loadLastNotAfter(ctx context.Context, views []*caView) error {
	if len(views) == 0 {
		return nil
	}
	ids := make([]string, len(views))
	for i, v := range views {
		ids[i] = v.rec.ID
	}
	last, err := s.store.LastSVIDNotAfter(ctx, ids)
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	now := s.now()
	for _, v := range views {
		t, ok := last[v.rec.ID]
		if !ok || !t.After(now) {
			continue
		}
		n := t.UnixNano()
		for {
			old := v.lastNotAfter.Load()
			if n <= old || v.lastNotAfter.CompareAndSwap(old, n) {
				break
			}
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
	if err := s.requireLeader(ctx); err != nil {
		return store.CARecord{}, err
	}
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
	_, rec, err := s.newCA(s.kek, store.CAPrepared)
	if err != nil {
		return store.CARecord{}, err
	}
	if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
		Time: s.now(), Actor: actor, Action: "ca.prepare", Target: rec.ID,
		Detail: fmt.Sprintf("valid until %s", rec.NotAfter.UTC().Format(time.RFC3339)),
	}); err != nil {
		return store.CARecord{}, fmt.Errorf("store prepared CA: %w", err)
	}
	// The projection publishes it in the bundle and re-plans the lifecycle.
	if err := s.synced(ctx); err != nil {
		return store.CARecord{}, err
	}
	s.log.Info("prepared CA: published in the trust bundle", "id", rec.ID, "not_after", rec.NotAfter, "actor", actor)
	return rec, nil
}

// activationSafeAt is when the prepared CA has been in the bundle long
// enough that every renewed peer holds it.
func (s *Server) activationSafeAt(p *caView) time.Time {
	return s.policy().SafeAt(p.lc())
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
	if err := s.requireLeader(ctx); err != nil {
		return store.CARecord{}, err
	}
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

	// Both in one transaction: written apart, a crash or a lost
	// leadership between them left two active CAs (repairActivation still
	// finishes such a state from older versions).
	next := p.rec
	next.State = store.CAActive
	retired := old.rec
	retired.State = store.CARetired
	if err := s.store.PutCAs(ctx, []store.CARecord{next, retired}, []store.AuditEvent{
		{Time: now, Actor: actor, Action: "ca.activate", Target: next.ID},
		{Time: now, Actor: actor, Action: "ca.retire", Target: retired.ID, Detail: "stays in the bundle until the last SVID it signed expires"},
	}); err != nil {
		return store.CARecord{}, fmt.Errorf("activate CA: %w", err)
	}
	if err := s.activateJWT(ctx, actor); err != nil {
		return store.CARecord{}, err
	}
	// The projection makes it the signing CA, publishes the bundle and,
	// with RotateSVIDsOnActivation, re-issues every served SVID.
	if err := s.synced(ctx); err != nil {
		return store.CARecord{}, err
	}
	s.log.Info("activated CA", "id", next.ID, "retired", retired.ID, "actor", actor)
	return next, nil
}

// policy is the configured lifecycle policy.
func (s *Server) policy() lifecycle.Policy {
	return lifecycle.Policy{PrepareAt: s.cfg.CAPrepareAt, ActivateAt: s.cfg.CAActivateAt, PrepareWindow: s.prepareWindow()}
}

// scheduleRotation arms the lifecycle timer for the next lifecycle event
// (lifecycle.Policy.Next): the next CA prepared or activated, a retired CA
// leaving the bundle, a revoked serial leaving its CRL, a JWT key leaving
// the JWKS.
func (s *Server) scheduleRotation() {
	if s.cfg.DisableAutoRotate {
		return
	}
	next, ok := s.nextRotationEvent()
	if !ok {
		s.rotTimer.cancel()
		return
	}
	s.rotTimer.reset(next.Sub(s.now()))
}

func (s *Server) nextRotationEvent() (time.Time, bool) {
	held := s.activationHeld() // before s.mu: it takes it
	s.mu.RLock()
	defer s.mu.RUnlock()
	now := s.now()
	cas := make([]lifecycle.CA, 0, len(s.cas))
	for _, v := range s.cas {
		cas = append(cas, v.lc())
	}
	var also []time.Time
	if t, ok := s.nextRevokedExpiry(); ok {
		also = append(also, t.Add(time.Millisecond))
	}
	for _, v := range s.jwtKeys {
		if v.rec.State == store.CARetired && now.Before(v.rec.NotAfter) {
			also = append(also, v.rec.NotAfter.Add(time.Millisecond))
		}
	}
	if held {
		return s.policy().NextHeld(now, cas, also...)
	}
	return s.policy().Next(now, cas, also...)
}

// rotationTick runs whatever lifecycle step is due, then re-arms. Steps
// run only on the leader; every replica re-publishes its bundle, since a
// CA or a revoked serial leaving it is a matter of time.
func (s *Server) rotationTick(ctx context.Context) {
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	if s.Leading() {
		var active, prepared *lifecycle.CA
		s.mu.RLock()
		for _, v := range s.cas {
			c := v.lc()
			switch {
			case v.rec.ID == s.activeID:
				active = &c
			case v.rec.State == store.CAPrepared:
				prepared = &c
			}
		}
		s.mu.RUnlock()
		switch step := s.policy().Due(s.now(), active, prepared); step {
		case lifecycle.Prepare:
			if _, err := s.prepareLocked(ctx, "server"); err != nil {
				s.rotationFailed(ctx, "prepare", err)
				return
			}
		case lifecycle.Activate:
			if !s.gatedActivation() {
				break // held for convergence: re-armed for the gate's next moment below
			}
			if _, err := s.activateLocked(ctx, "server", false); err != nil {
				s.rotationFailed(ctx, "activate", err)
				return
			}
		}
		// A revoked serial whose certificate expired leaves its CRL.
		if _, err := s.store.PruneRevoked(ctx, s.now()); err != nil {
			s.log.Error("prune revoked serials", "err", err)
		}
	}
	// A retired CA may have just left the bundle.
	if err := s.publishBundles(); err != nil {
		s.log.Error("publish bundles", "err", err)
	}
	s.scheduleRotation()
}

func (s *Server) rotationFailed(ctx context.Context, step string, err error) {
	if ctx.Err() != nil {
		return // closing
	}
	s.log.Error("CA rotation step failed; retrying in a minute", "step", step, "err", err)
	s.metrics.RotationFailures.Inc()
	s.rotTimer.reset(time.Minute)
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
