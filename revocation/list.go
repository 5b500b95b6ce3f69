// Package revocation is the revocation list as the server holds it: the
// certificates put on their CA's CRL before they expired, grouped by CA,
// with what the server asks of it (is this serial revoked, what goes on
// this CA's CRL now, when does the next one leave, is there room for
// more). A List is a value: changes return a new List, so a reader that
// took one under a lock keeps a consistent view without holding it, and
// CRLs can be signed from it outside the server's lock.
package revocation

import (
	"fmt"
	"math/big"
	"strings"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/store"
)

// List is an immutable set of revoked serials. The zero List is empty.
type List struct {
	byCA map[string][]store.RevokedSerial
	// serials holds every serial in Norm form, so that a handshake's
	// "is this revoked" is one lookup, not a scan of the list.
	serials map[string]bool
}

// Norm is the form serials are compared in: lowercase hex without leading
// zeros (big.Int.Text(16)), whatever the source.
func Norm(serial string) string { return strings.TrimLeft(strings.ToLower(serial), "0") }

// New returns a List of serials; a serial listed twice counts once.
func New(serials []store.RevokedSerial) List {
	l := List{byCA: map[string][]store.RevokedSerial{}, serials: map[string]bool{}}
	for _, r := range serials {
		if l.serials[Norm(r.Serial)] {
			continue
		}
		l.serials[Norm(r.Serial)] = true
		l.byCA[r.CAID] = append(l.byCA[r.CAID], r)
	}
	return l
}

func (l List) clone() List {
	n := List{byCA: make(map[string][]store.RevokedSerial, len(l.byCA)+1), serials: make(map[string]bool, len(l.serials)+1)}
	for k, v := range l.byCA {
		n.byCA[k] = v
	}
	for k := range l.serials {
		n.serials[k] = true
	}
	return n
}

// Put returns the List with r added, and whether it was not there yet (a
// serial already revoked keeps its first record).
func (l List) Put(r store.RevokedSerial) (List, bool) {
	if l.serials[Norm(r.Serial)] {
		return l, false
	}
	n := l.clone()
	n.serials[Norm(r.Serial)] = true
	n.byCA[r.CAID] = append(append([]store.RevokedSerial(nil), l.byCA[r.CAID]...), r)
	return n, true
}

// Delete returns the List without r's serial, and whether it was there.
func (l List) Delete(r store.RevokedSerial) (List, bool) {
	key := Norm(r.Serial)
	if !l.serials[key] {
		return l, false
	}
	n := l.clone()
	delete(n.serials, key)
	for caID, list := range n.byCA {
		for i, x := range list {
			if Norm(x.Serial) != key {
				continue
			}
			rest := append(append([]store.RevokedSerial(nil), list[:i]...), list[i+1:]...)
			if len(rest) == 0 {
				delete(n.byCA, caID)
			} else {
				n.byCA[caID] = rest
			}
			return n, true
		}
	}
	return n, true
}

// Len is how many serials are listed.
func (l List) Len() int { return len(l.serials) }

// Contains reports whether serial (hex, any case, leading zeros or not)
// is revoked.
func (l List) Contains(serial string) bool { return l.serials[Norm(serial)] }

// NextExpiry is when the soonest revoked certificate expires: it then
// leaves its CRL, which is re-signed.
func (l List) NextExpiry() (time.Time, bool) {
	var next time.Time
	for _, list := range l.byCA {
		for _, r := range list {
			if next.IsZero() || r.NotAfter.Before(next) {
				next = r.NotAfter
			}
		}
	}
	return next, !next.IsZero()
}

// CRLEntries are what caID's CRL lists at now: its revoked certificates
// not yet expired (an expired one is refused anyway, so CRLs stay small).
func (l List) CRLEntries(caID string, now time.Time) ([]ca.RevokedCert, error) {
	var out []ca.RevokedCert
	for _, r := range l.byCA[caID] {
		if !r.NotAfter.After(now) {
			continue
		}
		n, ok := new(big.Int).SetString(r.Serial, 16)
		if !ok {
			return nil, fmt.Errorf("revoked serial %q of CA %s is not hexadecimal", r.Serial, caID)
		}
		out = append(out, ca.RevokedCert{Serial: n, RevokedAt: r.RevokedAt})
	}
	return out, nil
}

// Listed is the set (in Norm form) of serials on the CRLs at now: not yet
// expired, of a CA for which published says a CRL is published.
func (l List) Listed(now time.Time, published func(caID string) bool) map[string]bool {
	out := map[string]bool{}
	for caID, list := range l.byCA {
		if !published(caID) {
			continue
		}
		for _, r := range list {
			if r.NotAfter.After(now) {
				out[Norm(r.Serial)] = true
			}
		}
	}
	return out
}

// RoomError is a revocation refused because the CRLs would list more
// serials than their limit.
type RoomError struct{ Add, Total, Limit int }

func (e *RoomError) Error() string {
	return fmt.Sprintf("revoking %d more serial(s) would list %d on the CRLs, over the limit of %d", e.Add, e.Total, e.Limit)
}

// CheckRoom refuses adding add serials to the listed ones past limit:
// past it the CRLs, pushed in every bundle, stop reaching peers (gRPC's
// message limits) and every identity is lost. Adding none always fits.
func CheckRoom(listed, add, limit int) error {
	if add == 0 || listed+add <= limit {
		return nil
	}
	return &RoomError{Add: add, Total: listed + add, Limit: limit}
}
