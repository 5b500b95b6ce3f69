package controlplane

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/meshid/meshid/revocation"
	"github.com/meshid/meshid/store"
)

// CRL policy defaults. A CRL is for the few credentials that must die
// before they expire; past DefaultMaxCRLSerials (about 0.4 MB of CRL, far
// under gRPC's 4 MiB message limit with the certificates beside it) the
// answer is replacing the CA (RotateCANow), not a longer list.
const (
	DefaultCRLValidity   = 24 * time.Hour
	DefaultMaxCRLSerials = 10_000
)

// maintenance is the server's own timer for what must happen whether or
// not the automatic CA lifecycle runs: CRLs re-signed before their
// nextUpdate, and emergency rotations finished.
type maintenance struct {
	// crlRefreshAt is when the current CRLs are re-signed (half their
	// validity); guarded by Server.pubMu.
	crlRefreshAt time.Time
	// reissueUntil is when the last re-issue an emergency rotation
	// scheduled is due; guarded by Server.rotMu.
	reissueUntil time.Time
	// armedFor is when the maintenance timer fires next; guarded by
	// Server.pubMu, under which every arming happens.
	armedFor time.Time
}

// crlValidity is how long a CRL stays fresh: never less than two SVID
// lives, so a peer that refreshes its bundle at each SVID renewal always
// holds a CRL that is current.
func (c *Config) crlValidity() time.Duration {
	v := c.CRLValidity
	if v == 0 {
		v = DefaultCRLValidity
	}
	return max(v, 2*c.SVIDTTL)
}

func (c *Config) maxCRLSerials() int {
	if c.MaxCRLSerials == 0 {
		return DefaultMaxCRLSerials
	}
	return c.MaxCRLSerials
}

// crlNextUpdate bounds a CRL's nextUpdate: TLS stacks that enforce it
// would otherwise treat a CRL as current long after it was replaced. It
// never lies past the issuer's own expiry.
func (s *Server) crlNextUpdate(now, issuerNotAfter time.Time) time.Time {
	next := now.Add(s.cfg.crlValidity())
	if issuerNotAfter.Before(next) {
		return issuerNotAfter
	}
	return next
}

// taintCheckInterval is how often an emergency rotation recounts the
// served SVIDs still on the old CA.
const taintCheckInterval = time.Second

// startMaintenance arms the maintenance timer; Open calls it once.
func (s *Server) startMaintenance() {
	s.metrics.Registry.MustRegister(newRetiredCACollector(s))
	s.armMaintenance()
}

// armMaintenance arms the timer for whichever is first: the next CRL
// refresh, the end of a follower's wait for the leader's CRLs, the
// leader's next attempt to store its set, a read of the stored set again,
// or, during an emergency rotation, the next recount.
func (s *Server) armMaintenance() {
	now := s.now()
	s.mu.RLock()
	tainting := s.taintedLocked() != nil
	s.mu.RUnlock()
	// pubMu is held through the reset: a follower starting to wait for
	// the leader's CRLs (crlset.go) arms the timer under it too, and must
	// not have its deadline replaced by a later one computed before.
	leading := s.Leading()
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	due := s.maint.crlRefreshAt
	if w := s.crl.waitUntil; !w.IsZero() && w.Before(due) {
		due = w // a follower's wait for the leader's CRLs ends
	}
	if r := s.crl.putRetryAt; leading && s.crl.putFailed && r.Before(due) {
		due = r // the leader stores its CRLs again
	}
	if !due.After(now) {
		// What was due has just been done by this tick, so this one
		// failed (a re-sign, a wait that could not end in a set): retry
		// soon, but not in a loop.
		due = now.Add(min(time.Minute, s.cfg.crlValidity()/8))
	}
	if s.crl.reload {
		if r := now.Add(time.Second); r.Before(due) {
			due = r // read the stored set again
		}
	}
	if check := now.Add(taintCheckInterval); tainting && check.Before(due) {
		due = check
	}
	s.maint.armedFor = due
	s.maintTimer.reset(due.Sub(now))
}

// maintenanceBy makes the maintenance timer fire by due, keeping an
// earlier arming. The caller holds pubMu.
func (s *Server) maintenanceBy(now, due time.Time) {
	if a := s.maint.armedFor; a.After(now) && !due.Before(a) {
		return
	}
	s.maint.armedFor = due
	s.maintTimer.reset(due.Sub(now))
}

// maintenanceTick advances an emergency rotation and re-signs and pushes
// the CRLs if they are due, then re-arms.
func (s *Server) maintenanceTick(ctx context.Context) {
	if s.Leading() {
		s.rotMu.Lock()
		if err := s.progressEmergency(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("emergency CA rotation: recount failed; retrying", "err", err)
		}
		s.rotMu.Unlock()
	}
	s.pubMu.Lock()
	reload := s.crl.reload
	s.pubMu.Unlock()
	if reload {
		if err := s.loadStoredCRLs(ctx); err != nil {
			s.log.Warn("read the leader's CRL set again", "err", err)
		}
	}
	// publishBundles re-signs the CRLs once crlRefreshAt has passed; the
	// new bytes change the bundle's version, so every peer gets them.
	if err := s.publishBundles(); err != nil {
		s.log.Error("re-sign CRLs before their nextUpdate", "err", fmt.Errorf("publish bundles: %w", err))
	}
	s.armMaintenance()
}

// checkCRLRoom refuses, before anything changes, a revocation of the live
// SVIDs match selects that would list more serials on the CRLs than
// MaxCRLSerials: past that the CRLs, pushed in every bundle, stop reaching
// peers (gRPC's message limits) and every identity is lost. Only serials
// of CAs still in the bundle count: the rest are on no CRL.
func (s *Server) checkCRLRoom(ctx context.Context, match func(store.IssuedSVID) bool) error {
	limit := s.cfg.maxCRLSerials()
	now := s.now()
	rows, _, err := s.store.ListSVIDs(ctx, store.SVIDQuery{NotExpiredAt: now})
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	s.mu.RLock()
	published := map[string]bool{}
	for _, v := range s.cas {
		if v.inBundle(now) {
			published[v.rec.ID] = true
		}
	}
	revoked := s.revoked.Listed(now, func(caID string) bool { return published[caID] })
	s.mu.RUnlock()
	add := 0
	for _, r := range rows {
		if published[r.CAID] && match(r) && !revoked[revocation.Norm(r.Serial)] {
			add++
		}
	}
	var room *revocation.RoomError
	if err := revocation.CheckRoom(len(revoked), add, limit); errors.As(err, &room) {
		return &FailedPreconditionError{msg: fmt.Sprintf(
			"%s (--max-crl-serials); at that scale replace the CA instead: 'meshid ca rotate --now' re-issues every served SVID from a new CA and drops the old one with its revocations",
			room)}
	}
	return nil
}
