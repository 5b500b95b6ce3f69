package controlplane

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
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
// A follower whose view has moved ahead of the stored set (a revocation,
// a new CA) keeps serving what it has for crlLeaderGrace, the time the
// leader needs to sign and store the set that matches; only if none comes
// (no leader, or one that cannot write) does it sign its own, so that no
// revocation waits on a lost leader and no CRL goes stale.

// crlLeaderGrace is how long a follower waits for the leader's CRLs. The
// leader's set normally arrives within a few milliseconds of the change.
const crlLeaderGrace = time.Second

// crlPutTimeout bounds the leader's write of a new set: it is made under
// pubMu, and a store without quorum must not hold publishing for long.
const crlPutTimeout = 2 * time.Second

// crlState is the server's CRL set; guarded by Server.pubMu.
type crlState struct {
	served *store.SignedCRLs // what the bundle carries
	stored *store.SignedCRLs // the leader's, as last read from the store
	number int64             // the last CRL number this server signed with
	// waitCovers and waitUntil: a follower waiting for the leader's set
	// for this view, until then.
	waitCovers string
	waitUntil  time.Time
	putTried   int64 // the number of the last set this leader tried to store
}

// crlCover is what a CRL set lists: for each CA ID (upstreamCover for the
// upstream CA), its revoked serials in hex.
type crlCover map[string][]string

const upstreamCover = "^upstream"

// String is the canonical form compared across replicas.
func (c crlCover) String() string {
	ids := make([]string, 0, len(c))
	for id := range c {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var b strings.Builder
	for _, id := range ids {
		b.WriteString(id)
		for _, s := range c[id] {
			b.WriteString("," + s)
		}
		b.WriteString(";")
	}
	return b.String()
}

// crls returns one CRL per CA peers may meet in a chain: every meshid CA
// in the bundle and, with an upstream CA, the upstream certificate. Envoy
// demands a CRL for every CA of a chain once it is given any, so CAs with
// nothing revoked get an empty one. The caller holds pubMu; what is listed
// is gathered under mu and signed after it is released, so a re-sign
// never stalls mints or matching.
func (s *Server) crls() ([][]byte, error) {
	now := s.now()
	type crlJob struct {
		v       *caView
		entries []ca.RevokedCert
	}
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
		serials := make([]string, len(entries))
		for i, e := range entries {
			serials[i] = e.Serial.Text(16)
		}
		cover[v.rec.ID] = serials
		jobs = append(jobs, crlJob{v, entries})
	}
	if s.cfg.Upstream != nil {
		upRevoked = s.revokedIntermediatesLocked(now)
		serials := make([]string, len(upRevoked))
		for i, r := range upRevoked {
			serials[i] = r.Serial.Text(16)
		}
		cover[upstreamCover] = serials
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
	fresh := func(c *store.SignedCRLs) bool { return c != nil && now.Before(c.RefreshAt.Add(slack)) }
	st := &s.crl
	switch {
	case fresh(st.stored) && st.stored.Covers == covers && (st.served == nil || st.stored.Number >= st.served.Number):
		st.served = st.stored
	case fresh(st.served) && st.served.Covers == covers:
		// Same CAs, same revocations: same CRLs. Re-signing would change
		// the bundle's bytes and push it to every peer for nothing.
	case !leading && fresh(st.served) && s.waitForLeader(covers, now):
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
		st.served = set
	}
	st.waitCovers, st.waitUntil = "", time.Time{}
	st.number = max(st.number, st.served.Number)
	s.maint.crlRefreshAt = st.served.RefreshAt.Add(slack)
	if leading {
		s.storeCRLs(*st.served)
	}
	return st.served.DER, nil
}

// waitForLeader reports whether a follower whose view is covers should
// still wait for the leader's set: for crlLeaderGrace from the first time
// it saw this view. The caller holds pubMu.
func (s *Server) waitForLeader(covers string, now time.Time) bool {
	st := &s.crl
	if st.waitCovers != covers {
		st.waitCovers, st.waitUntil = covers, now.Add(crlLeaderGrace)
		// The maintenance tick signs this replica's own set if the
		// leader's has not come by then.
		s.maintTimer.reset(crlLeaderGrace)
	}
	return now.Before(st.waitUntil)
}

// storeCRLs makes set the one every replica serves, unless it already is
// or this leader already tried it: a store that cannot write is not asked
// again at every publish, and the followers sign their own meanwhile. The
// caller holds pubMu.
func (s *Server) storeCRLs(set store.SignedCRLs) {
	st := &s.crl
	if (st.stored != nil && st.stored.Number == set.Number && st.stored.Covers == set.Covers) || st.putTried == set.Number {
		return
	}
	st.putTried = set.Number
	ctx, cancel := context.WithTimeout(s.tasks.ctx, crlPutTimeout)
	defer cancel()
	if err := s.store.PutCRLs(ctx, set); err != nil {
		level := s.log.Warn
		if errors.Is(err, store.ErrNotLeader) {
			level = s.log.Debug // the next leader stores its own
		}
		level("storing the CRLs for the other replicas failed; they sign their own", "number", set.Number, "err", err)
	}
}

// setStoredCRLs records the leader's set from the store (Open's listing or
// the watch), if it is one this server can serve.
func (s *Server) setStoredCRLs(set store.SignedCRLs) {
	for i, der := range set.DER {
		if _, err := x509.ParseRevocationList(der); err != nil {
			s.log.Error("the store's CRL set is undecodable; signing this replica's own", "number", set.Number, "crl", i, "err", err)
			return
		}
	}
	s.pubMu.Lock()
	s.crl.stored = &set
	s.pubMu.Unlock()
}

// loadStoredCRLs reads the leader's set at start-up or after a compaction.
func (s *Server) loadStoredCRLs(ctx context.Context) error {
	set, err := s.store.GetCRLs(ctx)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("load the signed CRLs: %w", err)
	}
	s.setStoredCRLs(set)
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
