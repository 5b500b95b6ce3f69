package controlplane

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/svidcache"
)

// RevokeResult says what a revocation did.
type RevokeResult struct {
	Serials        []store.RevokedSerial
	DeletedEntries []store.Entry
}

// Revoke kills an identity now rather than at its next expiry. With a
// SPIFFE ID: every entry for it is deleted (no renewal) and every live
// serial goes on its CA's CRL, and remote callers holding it directly have
// their streams ended. With a serial: that certificate goes on the CRL and,
// if a local workload is being served it, it gets a fresh one at once; a
// remote caller that authenticated with it has its streams ended, and
// whatever was renewed from it is revoked too (withDescendants).
// The new CRLs are pushed to every peer with the bundle.
func (s *Server) Revoke(ctx context.Context, spiffeID, serial, actor string) (RevokeResult, error) {
	if (spiffeID == "") == (serial == "") {
		return RevokeResult{}, invalidf("give exactly one of a SPIFFE ID or a serial")
	}
	serial = strings.ToLower(strings.TrimLeft(strings.ReplaceAll(serial, ":", ""), "0"))
	if spiffeID != "" {
		if _, err := s.parseWorkloadID(spiffeID); err != nil {
			return RevokeResult{}, err
		}
	} else if _, ok := new(big.Int).SetString(serial, 16); !ok {
		return RevokeResult{}, invalidf("serial %q is not hexadecimal", serial)
	}
	now := s.now()
	var res RevokeResult
	if serial != "" {
		rows, _, err := s.store.ListSVIDs(ctx, store.SVIDQuery{NotExpiredAt: now})
		if err != nil {
			return RevokeResult{}, fmt.Errorf("read inventory: %w", err)
		}
		if !slices.ContainsFunc(rows, func(r store.IssuedSVID) bool { return strings.TrimLeft(r.Serial, "0") == serial }) {
			return RevokeResult{}, fmt.Errorf("no live certificate with serial %s: %w", serial, store.ErrNotFound)
		}
	}
	if err := s.checkCRLRoom(ctx, func(r store.IssuedSVID) bool {
		return (spiffeID != "" && r.SpiffeID == spiffeID) || (serial != "" && strings.TrimLeft(r.Serial, "0") == serial)
	}); err != nil {
		return RevokeResult{}, err
	}
	// Stop renewal first: nothing new may be issued for a revoked ID.
	if spiffeID != "" {
		for _, e := range s.entriesFor(spiffeID) {
			d, err := s.deleteEntry(ctx, e.ID, actor)
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return res, err
			}
			if err == nil {
				res.DeletedEntries = append(res.DeletedEntries, d)
			}
		}
		// Callers holding the ID directly: their tokens go, their
		// certificates go on the CRL below (refused at the TLS endpoints),
		// and until a new token is made for it the ID is not served to
		// them again, even on streams already open.
		if _, err := s.store.DeleteTokensFor(ctx, spiffeID); err != nil {
			return res, fmt.Errorf("delete join tokens: %w", err)
		}
		s.match.ban(spiffeID)
		s.endDirect(spiffeID)
		s.ids.Drop(func(key string) bool { return svidcache.DirectKeyOf(key, spiffeID) })
		s.revokeJWTs(spiffeID, now) // its entries' deletions did too; this covers an ID without any
	}
	target := spiffeID
	if target == "" {
		target = serial
	}
	revoked, err := s.revokeRows(ctx, func(r store.IssuedSVID) bool {
		return (spiffeID != "" && r.SpiffeID == spiffeID) || (serial != "" && strings.TrimLeft(r.Serial, "0") == serial)
	}, target, actor, len(res.DeletedEntries))
	res.Serials = revoked
	return res, err
}

// revokeRows puts every live inventory row that match selects on its CA's
// CRL, pushes the new CRLs, and re-issues any served SVID among them.
func (s *Server) revokeRows(ctx context.Context, match func(store.IssuedSVID) bool, target, actor string, deletedEntries int) ([]store.RevokedSerial, error) {
	s.revMu.Lock()
	defer s.revMu.Unlock()
	now := s.now()
	rows, _, err := s.store.ListSVIDs(ctx, store.SVIDQuery{NotExpiredAt: now})
	if err != nil {
		return nil, fmt.Errorf("read inventory: %w", err)
	}
	var serials []store.RevokedSerial
	for _, r := range rows {
		if match(r) {
			serials = append(serials, store.RevokedSerial{Serial: r.Serial, CAID: r.CAID, SpiffeID: r.SpiffeID, NotAfter: r.NotAfter, RevokedAt: now})
		}
	}
	serials = withDescendants(rows, serials, now)
	if len(serials) == 0 {
		return nil, nil
	}
	if err := s.store.RevokeSerials(ctx, serials, store.AuditEvent{Time: now, Actor: actor, Action: "revoke", Target: target,
		Detail: fmt.Sprintf("%d live serial(s) put on the CRL, %d entries deleted", len(serials), deletedEntries)}); err != nil {
		return nil, fmt.Errorf("record revocation: %w", err)
	}
	// The projection re-signs and pushes the CRLs, ends the streams the
	// revoked certificates authenticated and re-issues served SVIDs among
	// them, on every replica.
	if err := s.synced(ctx); err != nil {
		return serials, err
	}
	s.log.Warn("revoked", "target", target, "serials", len(serials), "entries_deleted", deletedEntries, "actor", actor)
	return serials, nil
}

// entriesFor lists the registration entries for a SPIFFE ID.
func (s *Server) entriesFor(spiffeID string) []store.Entry {
	return s.entries.bySpiffeID(spiffeID)
}

// nextRevokedExpiry is when the soonest revoked certificate expires: its
// entry then leaves the CRL. The caller holds mu.
func (s *Server) nextRevokedExpiry() (time.Time, bool) { return s.revoked.NextExpiry() }

// CheckCRLs reports whether cert (issued by issuer) is revoked by any of
// crls. Peers that apply meshid's CRLs do exactly this; tests and tools use
// it to act as such a peer.
func CheckCRLs(cert, issuer *x509.Certificate, crls [][]byte) (bool, error) {
	for _, der := range crls {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			return false, fmt.Errorf("parse CRL: %w", err)
		}
		if rl.CheckSignatureFrom(issuer) != nil {
			continue
		}
		for _, e := range rl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(cert.SerialNumber) == 0 {
				return true, nil
			}
		}
	}
	return false, nil
}

// isRevoked reports whether one of our certificates is on a CRL.
func (s *Server) isRevoked(c *x509.Certificate) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.revoked.Contains(c.SerialNumber.Text(16))
}

// endRevokedStreams ends the streams of remote callers that authenticated
// with a revoked certificate: re-issuing to them would hand whoever holds
// it (perhaps a thief) a fresh, unrevoked one.
func (s *Server) endRevokedStreams(serials []store.RevokedSerial) {
	set := make(map[string]bool, len(serials))
	for _, r := range serials {
		set[normSerial(r.Serial)] = true
	}
	if n := s.endSerials(set); n > 0 {
		s.log.Warn("ended streams authenticated by revoked certificates", "streams", n)
	}
}
