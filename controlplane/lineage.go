package controlplane

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/meshid/meshid/revocation"
	"github.com/meshid/meshid/store"
)

// Lineage of remotely renewed SVIDs.
//
// A remote caller that authenticates with an SVID (TCP or REST SDS) is
// served SVIDs of its own, minted for that one authenticating certificate
// (slot key "id:<spiffe id>#<serial>"). Their inventory rows say where they
// come from: EntryID is the entry the authenticating certificate was
// issued under (inherited, so deleting the entry reaches every renewal
// descended from it), and Requester is "workload via svid <serial>", so a
// revocation of any certificate in the chain also revokes everything
// renewed from it. Without both, one stolen certificate would renew itself
// forever past its revocation and past its entry's deletion.

// requesterViaSVID is the inventory Requester of an SVID minted for a remote
// caller that authenticated with the certificate of serial.
func requesterViaSVID(serial string) string { return "workload via svid " + serial }

// requesterViaToken is the inventory Requester of an SVID minted for a
// remote caller that authenticated with a join token.
const requesterViaToken = "workload via token"

// normSerial is the form serials are compared in: lowercase hex without
// leading zeros (big.Int.Text(16)), whatever the source.
func normSerial(s string) string { return revocation.Norm(s) }

// lineage caches, for live certificates, the entry each was issued under,
// so that authenticating a remote caller does not read the inventory.
// Every SVID the server mints for workloads is noted as it is minted;
// anything else (admin mints, rows from before a restart, another
// replica's) is found by reloading the inventory on a miss, at most once
// per lineageReload.
type lineage struct {
	mu       sync.Mutex
	rows     map[string]lineageRow // by normSerial
	loadedAt time.Time
	notes    int
}

type lineageRow struct {
	entryID  string
	notAfter time.Time
}

const lineageReload = time.Second

func (l *lineage) note(serial, entryID string, notAfter, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rows == nil {
		l.rows = map[string]lineageRow{}
	}
	l.rows[normSerial(serial)] = lineageRow{entryID: entryID, notAfter: notAfter}
	// Expired rows go now and then: amortised over the notes.
	if l.notes++; l.notes >= 1024 && l.notes >= len(l.rows)/2 {
		l.notes = 0
		for k, r := range l.rows {
			if !now.Before(r.notAfter) {
				delete(l.rows, k)
			}
		}
	}
}

// cached is the entry serial was issued under, as far as known.
func (l *lineage) cached(serial string) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r, ok := l.rows[normSerial(serial)]
	return r.entryID, ok
}

// entryOfSerial is the entry the live certificate serial was issued under
// ("" for none, or if the inventory does not know it).
func (s *Server) entryOfSerial(ctx context.Context, serial string) (string, error) {
	l := &s.lin
	if e, ok := l.cached(serial); ok {
		return e, nil
	}
	now := s.now()
	l.mu.Lock()
	fresh := !l.loadedAt.IsZero() && now.Sub(l.loadedAt) < lineageReload
	l.mu.Unlock()
	if fresh {
		return "", nil
	}
	rows, _, err := s.store.ListSVIDs(ctx, store.SVIDQuery{NotExpiredAt: now})
	if err != nil {
		return "", fmt.Errorf("read inventory: %w", err)
	}
	l.mu.Lock()
	if l.rows == nil {
		l.rows = map[string]lineageRow{}
	}
	for _, r := range rows {
		l.rows[normSerial(r.Serial)] = lineageRow{entryID: r.EntryID, notAfter: r.NotAfter}
	}
	l.loadedAt = now
	l.mu.Unlock()
	e, _ := l.cached(serial)
	return e, nil
}

// withDescendants adds to serials every live row renewed, directly or
// through others, by a remote caller that authenticated with one of them.
func withDescendants(rows []store.IssuedSVID, serials []store.RevokedSerial, now time.Time) []store.RevokedSerial {
	children := map[string][]store.IssuedSVID{}
	for _, r := range rows {
		if p, ok := strings.CutPrefix(r.Requester, requesterViaSVID("")); ok {
			children[normSerial(p)] = append(children[normSerial(p)], r)
		}
	}
	if len(children) == 0 {
		return serials
	}
	seen := map[string]bool{}
	queue := make([]string, 0, len(serials))
	for _, s := range serials {
		seen[normSerial(s.Serial)] = true
		queue = append(queue, normSerial(s.Serial))
	}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, r := range children[p] {
			k := normSerial(r.Serial)
			if seen[k] {
				continue
			}
			seen[k] = true
			queue = append(queue, k)
			serials = append(serials, store.RevokedSerial{Serial: r.Serial, CAID: r.CAID, SpiffeID: r.SpiffeID, NotAfter: r.NotAfter, RevokedAt: now})
		}
	}
	return serials
}
