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

// bootstrap makes what a store without state needs, the first CA and JWT
// key, and finishes a rotation a crash interrupted (two active CAs: the
// newer won). It writes only as the leader, so replicas starting together
// on an empty store do not each make a CA; it returns the leadership it
// took, if it needed one.
func (s *Server) bootstrap(ctx context.Context) (store.Leadership, error) {
	needs := func(recs []store.CARecord) bool {
		var x, j int
		for _, r := range recs {
			if r.State != store.CAActive {
				continue
			}
			switch r.Kind {
			case "x509":
				x++
			case "jwt":
				j++
			}
		}
		return x != 1 || j == 0
	}
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		return nil, fmt.Errorf("load CAs: %w", err)
	}
	if !needs(recs) {
		return nil, nil
	}
	lead, err := s.campaignUnlessBootstrapped(ctx, needs)
	if err != nil {
		return nil, err
	}
	if lead == nil {
		return nil, nil // another replica made what was missing
	}
	if recs, err = s.store.ListCAs(ctx); err != nil {
		lead.Resign(context.Background())
		return nil, fmt.Errorf("load CAs: %w", err)
	}
	if err := s.bootstrapLocked(ctx, recs); err != nil {
		lead.Resign(context.Background())
		return nil, err
	}
	return lead, nil
}

// campaignUnlessBootstrapped campaigns for the leadership until it is
// won, or until the store's CAs no longer need bootstrapping: replicas
// starting together on an empty store wait while the first to lead makes
// the CA, then start as followers instead of waiting for a leadership the
// winner keeps for as long as it runs. It returns nil, nil in that case.
func (s *Server) campaignUnlessBootstrapped(ctx context.Context, needs func([]store.CARecord) bool) (store.Leadership, error) {
	rev, err := s.store.Revision(ctx)
	if err != nil {
		return nil, fmt.Errorf("read store revision: %w", err)
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	w, err := s.store.Watch(wctx, rev)
	if err != nil {
		return nil, fmt.Errorf("watch the store for the first CA: %w", err)
	}
	defer func() {
		stop()
		for range w.Responses() { // drained so the watch's goroutine is gone
		}
	}()
	// Made between the first listing and the watch: seen here.
	if recs, err := s.store.ListCAs(ctx); err != nil {
		return nil, fmt.Errorf("load CAs: %w", err)
	} else if !needs(recs) {
		return nil, nil
	}
	type won struct {
		l   store.Leadership
		err error
	}
	cctx, cancelCampaign := context.WithCancel(ctx)
	defer cancelCampaign()
	res := make(chan won, 1)
	go func() { // ends with cctx at the latest; its result is read below
		l, err := s.store.Campaign(cctx)
		res <- won{l, err}
	}()
	for {
		select {
		case r := <-res:
			if r.err != nil {
				return nil, fmt.Errorf("campaign to make the first CA: %w", r.err)
			}
			return r.l, nil
		case resp, ok := <-w.Responses():
			if !ok {
				// The watch ended (compacted, closed): the campaign alone decides.
				r := <-res
				if r.err != nil {
					return nil, fmt.Errorf("campaign to make the first CA: %w", r.err)
				}
				return r.l, nil
			}
			touched := false
			for _, ev := range resp.Events {
				touched = touched || ev.Kind == store.KindCA
			}
			if !touched {
				continue
			}
			recs, err := s.store.ListCAs(ctx)
			if err != nil {
				return nil, fmt.Errorf("load CAs: %w", err)
			}
			if needs(recs) {
				continue
			}
			cancelCampaign()
			if r := <-res; r.err == nil {
				// Won just as the other replica finished: not needed.
				_ = r.l.Resign(context.Background())
			}
			s.log.Info("another replica made the first CA; starting as a follower")
			return nil, nil
		}
	}
}

func (s *Server) bootstrapLocked(ctx context.Context, recs []store.CARecord) error {
	active, err := s.repairActivation(ctx, recs)
	if err != nil {
		return err
	}
	hasJWT := false
	for _, r := range recs {
		hasJWT = hasJWT || (r.Kind == "jwt" && r.State == store.CAActive)
	}
	if active == nil {
		_, rec, err := s.newCA(s.kek, store.CAActive)
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
	}
	if !hasJWT {
		j, rec, err := s.newJWTKey(s.kek, store.CAActive)
		if err != nil {
			return err
		}
		if err := s.store.PutCA(ctx, rec, &store.AuditEvent{Time: rec.CreatedAt, Actor: "server", Action: "jwt.create", Target: rec.ID,
			Detail: fmt.Sprintf("ES256 kid %s valid until %s", j.KeyID, j.NotAfter.UTC().Format(time.RFC3339))}); err != nil {
			return fmt.Errorf("store JWT key: %w", err)
		}
		s.log.Info("created JWT signing key", "kid", j.KeyID, "not_after", j.NotAfter)
	}
	return nil
}

// repairActivation finishes an activation interrupted between its two
// writes (the successor made active, the old CA not yet retired): the
// newest active X.509 CA wins and the others are retired. It returns the
// one active CA, or nil if there is none.
func (s *Server) repairActivation(ctx context.Context, recs []store.CARecord) (*store.CARecord, error) {
	var active *store.CARecord
	for i, r := range recs {
		if r.Kind == "x509" && r.State == store.CAActive && (active == nil || !r.CreatedAt.Before(active.CreatedAt)) {
			active = &recs[i]
		}
	}
	for _, r := range recs {
		if r.Kind == "x509" && r.State == store.CAActive && r.ID != active.ID {
			r.State = store.CARetired
			if err := s.store.PutCA(ctx, r, &store.AuditEvent{Time: s.now(), Actor: "server", Action: "ca.retire",
				Target: r.ID, Detail: "repair: a rotation was interrupted after activating its successor"}); err != nil {
				return nil, fmt.Errorf("repair CA %s: %w", r.ID, err)
			}
			s.log.Warn("finished an interrupted CA rotation", "retired", r.ID, "active", active.ID)
		}
	}
	return active, nil
}

// loadLastNotAfter finds, from the inventory, how long each CA's SVIDs
// live, so retired CAs leave the bundle exactly when they may.
func (s *Server) loadLastNotAfter(ctx context.Context, views []*caView) error {
	if len(views) == 0 {
		return nil
	}
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
