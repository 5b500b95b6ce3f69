package controlplane

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/store"
)

// One CRL set for the fleet. The leader signs the CRLs and puts them in
// the store (store.SignedCRLs); every replica serves those bytes while
// they list what its own view would. Replicas that each signed their own
// served the same revocations as different bytes, so each had its own
// trust-bundle version: every agent that failed over was pushed a bundle
// that differed only in CRL signatures, and reported it again.
//
// A follower whose view has moved ahead of the stored set (a revocation)
// keeps serving what it has for crlLeaderGrace, the time the leader needs
// to sign and store the set that matches; only if none comes (no leader,
// or one that cannot write) does it sign its own, so that no revocation
// waits on a lost leader and no CRL goes stale. A CA new to its bundle it
// does not wait for. A stored set is served only once its CRLs check
// against the replica's own CAs and list exactly what its own view would
// (checkStored).

// crlLeaderGrace is how long a follower waits for the leader's CRLs,
// counted from the first moment its view differed from what it serves,
// however often the view changes meanwhile. The leader's set normally
// arrives within a few milliseconds of the change.
const crlLeaderGrace = time.Second

// crlPutTimeout bounds the leader's write of a new set: it is made under
// pubMu, and a store without quorum must not hold publishing for long.
const crlPutTimeout = 2 * time.Second

// crlPutRetryMax caps the backoff between a leader's attempts to store its
// set after a failed write (no quorum, a set too large for etcd). Each
// attempt signs the set anew, so its number is above any a follower drew
// for its own meanwhile, and the followers adopt it.
const crlPutRetryMax = time.Minute

// crlStaleMargin: a stored set is not served once any of its CRLs is this
// close to its nextUpdate, whatever its RefreshAt says.
const crlStaleMargin = time.Minute

// crlState is the server's CRL set; guarded by Server.pubMu.
type crlState struct {
	served *store.SignedCRLs // what the bundle carries
	// servedOwn: served is a set this server signed as a follower, when
	// the leader's did not come in time.
	servedOwn bool
	servedCAs map[string]bool   // the CA IDs served has a CRL for
	refreshAt time.Time         // when served is due for re-signing
	stored    *store.SignedCRLs // the leader's, as last read from the store
	checked   storedCheck       // stored, verified against this server's CAs
	number    int64             // the last CRL number this server signed with
	// waitUntil, if set, is when a follower stops waiting for the
	// leader's set and signs its own.
	waitUntil time.Time
	// toStore: the leader has yet to store served (storeServedCRLs).
	toStore bool
	// reload: the last read of the stored set failed; the maintenance
	// tick reads it again.
	reload bool
	// A leader whose write of its set failed tries again at putRetryAt.
	putFailed  bool
	putRetryAt time.Time
	putBackoff time.Duration
}

// storedCheck memoises checkStored for one stored set and one set of CAs.
type storedCheck struct {
	set     *store.SignedCRLs
	cas     string
	cover   string
	refresh time.Time
	ok      bool
}

// crlCover is what a CRL set lists: for each CA ID (upstreamCover for the
// upstream CA), its revoked serials in hex.
type crlCover map[string][]string

const upstreamCover = "^upstream"

// String is the canonical form compared across replicas: CA IDs and each
// CA's serials sorted, so the order revocations were applied in (which
// differs between a replica that listed them and one that watched them
// arrive) does not matter.
func (c crlCover) String() string {
	var b strings.Builder
	for _, id := range slices.Sorted(maps.Keys(c)) {
		b.WriteString(id)
		for _, s := range slices.Sorted(slices.Values(c[id])) {
			b.WriteString("," + s)
		}
		b.WriteString(";")
	}
	return b.String()
}

func (c crlCover) ids() map[string]bool {
	out := make(map[string]bool, len(c))
	for id := range c {
		out[id] = true
	}
	return out
}

// crlJob is one CRL to sign: a CA in the bundle and its revoked serials.
type crlJob struct {
	v       *caView
	entries []ca.RevokedCert
}

// crls returns one CRL per CA peers may meet in a chain: every meshid CA
// in the bundle and, with an upstream CA, the upstream certificate. Envoy
// demands a CRL for every CA of a chain once it is given any, so CAs with
// nothing revoked get an empty one. The caller holds pubMu; what is listed
// is gathered under mu and signed after it is released, so a re-sign
// never stalls mints or matching.
func (s *Server) crls() ([][]byte, error) {
	now := s.now()
	var jobs []crlJob
	var upRevoked []ca.RevokedCert
	cover := crlCover{}
	s.mu.RLock()
	for _, v := range s.cas {
		if !v.inBundle(now) || v.auth == nil {
			continue
		}
		entries, err := s.revoked.CRLEntries(v.rec.ID, now)
		if err != nil {
			s.mu.RUnlock()
			return nil, err
		}
		cover[v.rec.ID] = serialsOf(entries)
		jobs = append(jobs, crlJob{v, entries})
	}
	if s.cfg.Upstream != nil {
		upRevoked = s.revokedIntermediatesLocked(now)
		cover[upstreamCover] = serialsOf(upRevoked)
	}
	s.mu.RUnlock()
	covers := cover.String()
	leading := s.Leading()
	// A follower gives the leader its grace before it re-signs a set that
	// is due, as it does for a changed view.
	var slack time.Duration
	if !leading {
		slack = crlLeaderGrace
	}
	st := &s.crl
	if !leading {
		st.putFailed = false // retrying is the leader's, whoever that is now
	}
	// A leader whose last write failed signs anew when its retry is due.
	resign := leading && st.putFailed && !now.Before(st.putRetryAt)
	var adopt bool
	var adoptRefresh time.Time
	// A replica never goes back to a lower CRL number, except from a set
	// of its own it signed because the leader's was late: then the
	// leader's, when it comes, is worth the one step back (validators
	// pick a CRL by issuer and time, not by comparing numbers across
	// loads), or the fleet would stay split until the next change.
	if !resign && st.stored != nil && (st.served == nil || st.stored.Number >= st.served.Number || st.servedOwn) {
		c := s.checkStored(st.stored, jobs)
		adopt = c.ok && c.cover == covers && now.Before(c.refresh.Add(slack))
		adoptRefresh = c.refresh
	}
	switch {
	case adopt:
		// Served with what its CRLs were checked to list: the stored
		// Covers is only the store's word, and the keep case below
		// compares it with later views.
		adopted := *st.stored
		adopted.Covers = covers
		st.served, st.servedCAs, st.refreshAt = &adopted, cover.ids(), adoptRefresh
		st.servedOwn = false
	case !resign && st.served != nil && st.served.Covers == covers && now.Before(st.refreshAt.Add(slack)):
		// Same CAs, same revocations: same CRLs. Re-signing would change
		// the bundle's bytes and push it to every peer for nothing.
	case !leading && st.served != nil && now.Before(st.refreshAt.Add(slack)) && subset(cover.ids(), st.servedCAs) && s.waitForLeader(now):
		// A CA new to the bundle is not waited for: until its CRL comes,
		// Envoy would refuse every chain through it.
		return st.served.DER, nil
	default:
		set := &store.SignedCRLs{Covers: covers, Number: s.nextCRLNumber(now), SignedAt: now,
			RefreshAt: now.Add(s.cfg.crlValidity() / 2)}
		for _, j := range jobs {
			der, err := ca.SignCRL(j.v.cert, j.v.auth.Key, j.entries, set.Number, now, s.crlNextUpdate(now, j.v.cert.NotAfter))
			if err != nil {
				return nil, err
			}
			set.DER = append(set.DER, der)
		}
		if up := s.cfg.Upstream; up != nil {
			der, err := ca.SignCRL(up.Cert, up.Key, upRevoked, set.Number, now, s.crlNextUpdate(now, up.Cert.NotAfter))
			if err != nil {
				return nil, err
			}
			set.DER = append(set.DER, der)
		}
		st.served, st.servedCAs, st.refreshAt = set, cover.ids(), set.RefreshAt
		st.servedOwn = !leading
		role := "follower"
		if leading {
			role = "leader"
		}
		s.metrics.CRLSetsSigned.WithLabelValues(role).Inc()
	}
	s.metrics.CRLNumber.Set(float64(st.served.Number))
	st.waitUntil = time.Time{}
	st.number = max(st.number, st.served.Number)
	s.maint.crlRefreshAt = st.refreshAt.Add(slack)
	s.maintenanceBy(now, s.maint.crlRefreshAt)
	st.toStore = leading
	return st.served.DER, nil
}

// storeServedCRLs is publishBundles' last step on the leader: the set goes
// to the store after this server's own peers have it, so that the write
// does not delay them. The caller holds pubMu.
func (s *Server) storeServedCRLs() {
	if st := &s.crl; st.toStore {
		st.toStore = false
		s.storeCRLs(s.now(), *st.served)
	}
}

func serialsOf(entries []ca.RevokedCert) []string {
	out := make([]string, len(entries))
	for i, e := range entries {
		out[i] = e.Serial.Text(16)
	}
	return out
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func subset(a, b map[string]bool) bool {
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

// checkStored verifies a set from the store against this server's CAs
// before it is served: every CRL parses, carries the set's number and is
// signed by a CA this server would sign one for, one CRL per CA; what it
// covers is read from the CRLs themselves, not taken from the set's
// Covers, and it is due for refresh no later than crlStaleMargin before
// the first of its CRLs goes stale. A store is shared state: a bug or a
// stolen etcd credential must not get a replica to serve an old CRL that
// leaves a revocation out. The caller holds pubMu.
func (s *Server) checkStored(set *store.SignedCRLs, jobs []crlJob) storedCheck {
	var cas strings.Builder
	for _, j := range jobs {
		cas.WriteString(j.v.rec.ID + ";")
	}
	up := s.cfg.Upstream
	if up != nil {
		cas.WriteString(upstreamCover)
	}
	st := &s.crl
	if st.checked.set == set && st.checked.cas == cas.String() {
		return st.checked
	}
	res := storedCheck{set: set, cas: cas.String(), refresh: set.RefreshAt}
	cover := crlCover{}
	bad := func(why string, args ...any) storedCheck {
		s.log.Warn("the stored CRL set does not check against this replica's CAs; signing its own", append([]any{"number", set.Number, "why", why}, args...)...)
		st.checked = res
		return res
	}
	if len(set.DER) != len(jobs)+btoi(up != nil) {
		// Not an error: the leader's view and this one differ by a CA
		// for a moment around a CA change.
		st.checked = res
		return res
	}
	for i, der := range set.DER {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			return bad("undecodable", "crl", i, "err", err)
		}
		if rl.Number == nil || !rl.Number.IsInt64() || rl.Number.Int64() != set.Number {
			return bad("number differs from the set's", "crl", i)
		}
		id := ""
		for _, j := range jobs {
			if rl.CheckSignatureFrom(j.v.cert) == nil {
				id = j.v.rec.ID
				break
			}
		}
		if id == "" && up != nil && rl.CheckSignatureFrom(up.Cert) == nil {
			id = upstreamCover
		}
		if _, dup := cover[id]; dup {
			return bad("a second CRL for one CA", "crl", i)
		}
		if id == "" {
			// Usually not tampering: the leader's view and this one
			// differ by a CA for a moment around a CA change.
			s.log.Debug("the stored CRL set has a CRL of a CA outside this replica's bundle; not serving it", "number", set.Number, "crl", i)
			st.checked = res
			return res
		}
		serials := make([]string, len(rl.RevokedCertificateEntries))
		for k, e := range rl.RevokedCertificateEntries {
			serials[k] = e.SerialNumber.Text(16)
		}
		cover[id] = serials
		if r := rl.NextUpdate.Add(-crlStaleMargin); r.Before(res.refresh) {
			res.refresh = r
		}
	}
	res.cover, res.ok = cover.String(), true
	st.checked = res
	return res
}

// waitForLeader reports whether a follower should still wait for the
// leader's set: for crlLeaderGrace from the first time its view differed
// from what it serves. The caller holds pubMu.
func (s *Server) waitForLeader(now time.Time) bool {
	st := &s.crl
	if st.waitUntil.IsZero() {
		st.waitUntil = now.Add(crlLeaderGrace)
		// The maintenance tick signs this replica's own set if the
		// leader's has not come by then.
		s.maintenanceBy(now, st.waitUntil)
	}
	return now.Before(st.waitUntil)
}

// storeCRLs makes set the one every replica serves, unless it already is.
// After a failed write the next attempt waits for a backoff and signs anew
// (crls); the followers sign their own meanwhile. The caller holds pubMu.
func (s *Server) storeCRLs(now time.Time, set store.SignedCRLs) {
	st := &s.crl
	if st.stored != nil && st.stored.Number == set.Number {
		return
	}
	if st.putFailed && now.Before(st.putRetryAt) {
		return
	}
	ctx, cancel := context.WithTimeout(s.tasks.ctx, crlPutTimeout)
	defer cancel()
	err := s.store.PutCRLs(ctx, set)
	if err == nil {
		// Stored: a publish before the watch says so must not write it
		// again.
		st.putFailed, st.putBackoff, st.stored = false, 0, &set
		return
	}
	s.metrics.CRLStoreFailures.Inc()
	st.putBackoff = min(max(2*st.putBackoff, time.Second), crlPutRetryMax)
	st.putFailed, st.putRetryAt = true, now.Add(st.putBackoff)
	s.maintenanceBy(now, st.putRetryAt)
	level := s.log.Warn
	if errors.Is(err, store.ErrNotLeader) {
		level = s.log.Debug // the next leader stores its own
	}
	level("storing the CRLs for the other replicas failed; they sign their own until it works",
		"number", set.Number, "retry_in", st.putBackoff, "err", err)
}

// loadStoredCRLs reads the leader's set: at start-up, after a compaction,
// and when the watch says it changed (the event does not carry the CRLs,
// so that a watch log holding many changes stays small).
func (s *Server) loadStoredCRLs(ctx context.Context) error {
	set, err := s.store.GetCRLs(ctx)
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	switch {
	case errors.Is(err, store.ErrNotFound):
		s.crl.reload = false
		return nil
	case err != nil:
		// Read again from the maintenance tick; meanwhile a follower
		// signs its own once its wait ends.
		s.crl.reload = true
		now := s.now()
		s.maintenanceBy(now, now.Add(time.Second))
		return fmt.Errorf("load the signed CRLs: %w", err)
	}
	s.crl.stored, s.crl.reload = &set, false
	return nil
}

// crlCounter is the store counter CRL numbers come from: one for every
// issuer, so each issuer's numbers grow too (RFC 5280 5.2.3), across
// restarts and across replicas.
const crlCounter = "crl"

// nextCRLNumber is the number for the CRLs signed now. The store's counter
// keeps numbers growing across restarts and replicas; milliseconds are its
// floor, which keeps them growing after a store was wiped. If the store
// cannot count (a full disk), the CRLs are still re-signed, numbered
// locally, rather than left to go stale. The caller holds pubMu.
func (s *Server) nextCRLNumber(now time.Time) int64 {
	floor := max(now.UnixMilli(), s.crl.number+1)
	ctx, cancel := context.WithTimeout(s.tasks.ctx, 5*time.Second)
	defer cancel()
	n, err := s.store.NextCRLNumber(ctx, crlCounter, floor)
	if err != nil {
		s.log.Warn("CRL number from the store failed; numbering locally", "err", err)
		n = floor
	}
	s.crl.number = max(n, floor)
	return s.crl.number
}
