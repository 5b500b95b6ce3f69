package controlplane

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/svidcache"
)

// EmergencyRotation says what RotateCANow did.
type EmergencyRotation struct {
	// Active is the new signing CA; Old the one it replaced, now tainted
	// (or revoked at once with dropOld).
	Active, Old store.CARecord
	// Reissuing is how many served SVIDs were scheduled for re-issue.
	Reissuing int
}

// RotateCANow is the emergency rotation, the answer to a compromised CA key
// or a revocation too large for a CRL (SPIRE's taint and revoke of a local
// authority, in one step). A new CA is made and activated at once, without
// the publication window; every SVID the server serves is re-issued by it,
// spread to stay within the signing limits; the old CA is tainted: it stays
// in the trust bundle only while a served SVID still depends on it, then
// is revoked (dropped from the bundle, with its CRL and every revocation on
// it, moot now that nothing chains to it). With dropOld it is revoked at
// once: peers still holding its SVIDs fail handshakes until re-issued.
//
// SVIDs the server does not serve (minted with the admin API, pod
// certificates) die with the old CA.
func (s *Server) RotateCANow(ctx context.Context, actor string, dropOld bool) (EmergencyRotation, error) {
	if err := s.requireLeader(ctx); err != nil {
		return EmergencyRotation{}, err
	}
	s.rotMu.Lock()
	defer s.rotMu.Unlock()
	if s.cfg.Upstream != nil && len(s.cfg.Upstream.Chain) > 0 {
		// Peers check only the leaf's CRL there (see publishBundles), and
		// the bundle is the upstream root: nothing meshid signs can
		// withdraw trust in the old intermediate.
		return EmergencyRotation{}, &FailedPreconditionError{msg: "the upstream CA has CAs above it, so peers cannot be told to stop trusting meshid's old intermediate; rotate at the upstream instead"}
	}
	_, oldID := s.activeCA()
	now := s.now()
	// A prepared CA is discarded, not used: in a key compromise its key,
	// sealed beside the active one, is no safer. It signed nothing.
	if p := s.preparedCA(); p != nil {
		if err := s.setCAStateLocked(ctx, p.rec.ID, store.CARevoked, store.AuditEvent{Time: now, Actor: actor, Action: "ca.revoke",
			Target: p.rec.ID, Detail: "prepared CA discarded by an emergency rotation; it signed nothing"}); err != nil {
			return EmergencyRotation{}, err
		}
	}
	// Its JWT partner too, so prepareLocked makes a fresh one.
	if err := s.dropJWTLocked(ctx, actor, now, store.CAPrepared, "prepared JWT key discarded by an emergency rotation; it signed nothing"); err != nil {
		return EmergencyRotation{}, err
	}
	if _, err := s.prepareLocked(ctx, actor); err != nil {
		return EmergencyRotation{}, fmt.Errorf("emergency rotation: prepare: %w", err)
	}
	next, err := s.activateLocked(ctx, actor, true)
	if err != nil {
		return EmergencyRotation{}, fmt.Errorf("emergency rotation: activate: %w", err)
	}
	state, action, detail := store.CATainted, "ca.taint", "emergency rotation: published only while a served SVID depends on it"
	if dropOld {
		state, action, detail = store.CARevoked, "ca.revoke", "emergency rotation with --drop-old: removed from the trust bundle at once"
	}
	// The projection counts the served SVIDs that depend on it before it
	// publishes the tainted view (refreshCAs).
	if err := s.setCAStateLocked(ctx, oldID, state, store.AuditEvent{Time: now, Actor: actor, Action: action, Target: oldID, Detail: detail}); err != nil {
		return EmergencyRotation{}, err
	}
	old := s.caByID(oldID)
	if dropOld {
		// The JWT key retired with the CA would stay in the JWKS for one
		// JWT TTL; a compromise is the reason to drop it now too.
		if err := s.dropJWTLocked(ctx, actor, now, store.CARetired, "emergency rotation with --drop-old: removed from the JWKS at once"); err != nil {
			return EmergencyRotation{}, err
		}
	}
	step := s.reissueStep()
	n := s.ids.Reissue(func(svidcache.SlotView) bool { return true }, step)
	s.maint.reissueUntil = now.Add(time.Duration(n) * step)
	if err := s.publishBundles(); err != nil {
		return EmergencyRotation{}, err
	}
	s.log.Warn("emergency CA rotation", "active", next.ID, "old", oldID, "old_state", state, "reissuing", n,
		"spread", (time.Duration(n) * step).Truncate(time.Millisecond), "actor", actor)
	s.armMaintenance()
	return EmergencyRotation{Active: next, Old: old.rec, Reissuing: n}, nil
}

// dropJWTLocked revokes every JWT key in state that is still in the JWKS.
// The caller holds rotMu.
func (s *Server) dropJWTLocked(ctx context.Context, actor string, now time.Time, state store.CAState, why string) error {
	s.mu.RLock()
	views := slices.Clone(s.jwtKeys)
	s.mu.RUnlock()
	for i := range views {
		if views[i].rec.State != state || !now.Before(views[i].rec.NotAfter) {
			continue
		}
		views[i].rec.State = store.CARevoked
		// jwtBundle lists a key until NotAfter has passed.
		views[i].rec.NotAfter = now.Add(-time.Second)
		if err := s.store.PutCA(ctx, views[i].rec, &store.AuditEvent{Time: now, Actor: actor, Action: "jwt.revoke", Target: views[i].rec.ID,
			Detail: why}); err != nil {
			return fmt.Errorf("revoke JWT key %s: %w", views[i].rec.ID, err)
		}
	}
	return s.synced(ctx)
}

// reissueStep spaces re-issues so that a fleet-wide one queues inside the
// signing limits instead of failing against them: one rate-limit interval
// apart, or, without a rate limit, about a millisecond per signing slot.
func (s *Server) reissueStep() time.Duration {
	if s.cfg.SignRate > 0 {
		return time.Duration(float64(time.Second) / s.cfg.SignRate)
	}
	return time.Millisecond / time.Duration(max(s.cfg.SignConcurrency, 1))
}

// setCAStateLocked records a CA's new state and waits for the projection
// to hold it. The caller holds rotMu.
func (s *Server) setCAStateLocked(ctx context.Context, id string, state store.CAState, ev store.AuditEvent) error {
	v := s.caByID(id)
	if v == nil {
		return fmt.Errorf("CA %s vanished", id)
	}
	rec := v.rec
	rec.State = state
	if err := s.store.PutCA(ctx, rec, &ev); err != nil {
		return fmt.Errorf("record CA %s as %s: %w", id, state, err)
	}
	return s.synced(ctx)
}

// taintedLocked returns the CAs an emergency rotation is retiring; the
// caller holds mu.
func (s *Server) taintedLocked() []*caView {
	var out []*caView
	for _, v := range s.cas {
		if v.rec.State == store.CATainted {
			out = append(out, v)
		}
	}
	return out
}

// progressEmergency recounts the served SVIDs on each tainted CA, re-issues
// any that the rotation's first pass missed (minted by the old CA while it
// ran), and revokes a tainted CA nothing served depends on any more. The
// caller holds rotMu.
func (s *Server) progressEmergency(ctx context.Context) error {
	s.mu.RLock()
	tainted := s.taintedLocked()
	s.mu.RUnlock()
	now := s.now()
	for _, v := range tainted {
		n := s.servedBy(v.cert)
		if n > 0 {
			v.dependents.Store(int64(n))
			until := s.maint.reissueUntil
			s.ids.Reissue(func(sl svidcache.SlotView) bool {
				return signedBy(sl.Leaf, v.cert) && sl.RenewAt.After(until.Add(time.Second))
			}, s.reissueStep())
			continue
		}
		if err := s.setCAStateLocked(ctx, v.rec.ID, store.CARevoked, store.AuditEvent{Time: now, Actor: "server", Action: "ca.revoke",
			Target: v.rec.ID, Detail: "emergency rotation finished: no served SVID depends on it; removed from the trust bundle"}); err != nil {
			return err
		}
		// Only now: a zero count takes a tainted CA out of the bundle, and
		// nothing may see it gone from the bundle but still tainted (or, if
		// the write failed, gone without the store saying revoked).
		v.dependents.Store(0)
		s.log.Info("emergency CA rotation finished: the old CA left the trust bundle", "ca", v.rec.ID)
	}
	return nil
}

// revokedIntermediatesLocked lists, for the upstream CA's CRL, meshid
// intermediates revoked by an emergency rotation and not yet expired: the
// bundle is the upstream root, so its CRL is what stops trust in them. The
// caller holds mu.
func (s *Server) revokedIntermediatesLocked(now time.Time) []ca.RevokedCert {
	var out []ca.RevokedCert
	for _, v := range s.cas {
		if v.rec.State == store.CARevoked && len(v.rec.ChainDER) > 0 && now.Before(v.cert.NotAfter) {
			at := v.stateAt
			if at.IsZero() {
				// Revoked before a restart: the time is in the audit
				// trail, not here; any time before this CRL is true.
				at = now.Add(-time.Minute)
			}
			out = append(out, ca.RevokedCert{Serial: v.cert.SerialNumber, RevokedAt: at})
		}
	}
	return out
}

// signedBy reports whether issuer signed leaf: by key identifier where both
// carry one, else by signature.
func signedBy(leaf, issuer *x509.Certificate) bool {
	if leaf == nil {
		return false
	}
	if len(leaf.AuthorityKeyId) > 0 && len(issuer.SubjectKeyId) > 0 {
		return bytes.Equal(leaf.AuthorityKeyId, issuer.SubjectKeyId)
	}
	return leaf.CheckSignatureFrom(issuer) == nil
}

// servedOnRetired counts served SVIDs whose CA no longer signs: what an
// emergency (or any) rotation still has to re-issue.
func (s *Server) servedOnRetired() int {
	s.mu.RLock()
	var retired []*x509.Certificate
	now := s.now()
	for _, v := range s.cas {
		if (v.rec.State == store.CARetired || v.rec.State == store.CATainted) && v.inBundle(now) {
			retired = append(retired, v.cert)
		}
	}
	s.mu.RUnlock()
	n := 0
	for _, c := range retired {
		n += s.servedBy(c)
	}
	return n
}

// retiredCACollector exports meshid_svids_on_retired_ca at scrape time.
type retiredCACollector struct {
	srv  *Server
	desc *prometheus.Desc
}

func newRetiredCACollector(s *Server) *retiredCACollector {
	return &retiredCACollector{srv: s, desc: prometheus.NewDesc("meshid_svids_on_retired_ca",
		"Served X.509-SVIDs signed by a CA that no longer signs (retired, or tainted by an emergency rotation): 0 once a rotation has re-issued them all.", nil, nil)}
}

func (c *retiredCACollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *retiredCACollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(c.srv.servedOnRetired()))
}
