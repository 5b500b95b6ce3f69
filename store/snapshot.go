package store

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"time"
)

// SnapshotCounts is how many rows of each kind a Snapshot holds.
type SnapshotCounts struct {
	CAs        int `json:"cas"`
	Entries    int `json:"entries"`
	SVIDs      int `json:"inventory_rows"`
	Audit      int `json:"audit_events"`
	Tokens     int `json:"join_tokens"`
	Revoked    int `json:"revoked_serials"`
	Agents     int `json:"agents"`
	CRLNumbers int `json:"crl_numbers"`
}

// Counts counts snap's rows per kind.
func (snap *Snapshot) Counts() SnapshotCounts {
	return SnapshotCounts{
		CAs: len(snap.CAs), Entries: len(snap.Entries), SVIDs: len(snap.SVIDs), Audit: len(snap.Audit),
		Tokens: len(snap.Tokens), Revoked: len(snap.Revoked), Agents: len(snap.Agents), CRLNumbers: len(snap.CRLNumbers),
	}
}

// Empty reports whether c counts nothing at all.
func (c SnapshotCounts) Empty() bool { return c == SnapshotCounts{} }

// String lists the kinds c counts any of ("3 entries, 1 CA"), or "nothing".
func (c SnapshotCounts) String() string {
	var parts []string
	add := func(n int, one, many string) {
		switch {
		case n == 1:
			parts = append(parts, "1 "+one)
		case n > 1:
			parts = append(parts, fmt.Sprintf("%d %s", n, many))
		}
	}
	add(c.CAs, "CA record", "CA records")
	add(c.Entries, "entry", "entries")
	add(c.SVIDs, "inventory row", "inventory rows")
	add(c.Audit, "audit event", "audit events")
	add(c.Tokens, "join token", "join tokens")
	add(c.Revoked, "revoked serial", "revoked serials")
	add(c.Agents, "agent record", "agent records")
	add(c.CRLNumbers, "CRL counter", "CRL counters")
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ", ")
}

// TrustBundle is the part of snap that peers trust: the SHA-256 (hex) of
// every X.509 CA certificate and JWT public key whose record is not
// revoked, sorted, each prefixed with its kind ("x509:ab12...").
func (snap *Snapshot) TrustBundle() []string {
	var out []string
	for _, c := range snap.CAs {
		if c.State == CARevoked {
			continue
		}
		der := c.CertDER
		if c.Kind == "jwt" {
			der = c.PublicKey
		}
		if len(der) == 0 {
			continue
		}
		sum := sha256.Sum256(der)
		out = append(out, c.Kind+":"+hex.EncodeToString(sum[:]))
	}
	slices.Sort(out)
	return out
}

// DiffSnapshots compares two snapshots row by row and returns one line per
// difference (nil if they hold the same state). Backends need not agree on
// representation details that carry no state: a nil and an empty slice are
// the same, and times are compared as instants (not by location or
// monotonic reading).
func DiffSnapshots(a, b Snapshot) []string {
	var out []string
	diffRows(&out, "CA", a.CAs, b.CAs, func(c CARecord) string { return c.ID })
	diffRows(&out, "entry", a.Entries, b.Entries, func(e Entry) string { return e.ID })
	diffRows(&out, "inventory row", a.SVIDs, b.SVIDs, func(s IssuedSVID) string { return s.Serial })
	diffRows(&out, "audit event", a.Audit, b.Audit, func(e AuditEvent) string { return e.Action + " " + e.Target })
	diffRows(&out, "join token", a.Tokens, b.Tokens, func(t JoinToken) string { return t.SpiffeID })
	diffRows(&out, "revoked serial", a.Revoked, b.Revoked, func(r RevokedSerial) string { return r.Serial })
	diffRows(&out, "agent", a.Agents, b.Agents, func(r AgentRecord) string { return r.ID })
	var crl []string
	for id, n := range a.CRLNumbers {
		if m, ok := b.CRLNumbers[id]; !ok {
			crl = append(crl, fmt.Sprintf("CRL number of %s: %d, missing on the other side", id, n))
		} else if m != n {
			crl = append(crl, fmt.Sprintf("CRL number of %s: %d, other side %d", id, n, m))
		}
	}
	for id, m := range b.CRLNumbers {
		if _, ok := a.CRLNumbers[id]; !ok {
			crl = append(crl, fmt.Sprintf("CRL number of %s: missing, other side %d", id, m))
		}
	}
	slices.Sort(crl) // map order is random; the diff is not
	return append(out, crl...)
}

// diffRows compares two row lists in order and names, for each row that
// differs, the fields that do (not their values: sealed keys and token
// hashes stay out of messages); name says which row it is.
func diffRows[T any](out *[]string, kind string, a, b []T, name func(T) string) {
	if len(a) != len(b) {
		*out = append(*out, fmt.Sprintf("%s rows: %d, other side %d", kind, len(a), len(b)))
	}
	for i := range min(len(a), len(b)) {
		va, vb := reflect.ValueOf(a[i]), reflect.ValueOf(b[i])
		var fields []string
		for f := range va.NumField() {
			if !reflect.DeepEqual(normalize(va.Field(f)), normalize(vb.Field(f))) {
				fields = append(fields, va.Type().Field(f).Name)
			}
		}
		if len(fields) > 0 {
			*out = append(*out, fmt.Sprintf("%s #%d (%s) differs in %s", kind, i, name(a[i]), strings.Join(fields, ", ")))
		}
	}
}

var timeType = reflect.TypeFor[time.Time]()

// normalize turns v into plain data that reflect.DeepEqual compares as
// DiffSnapshots promises: times become UnixNano-exact instants, empty
// slices nil.
func normalize(v reflect.Value) any {
	switch {
	case v.Type() == timeType:
		t := v.Interface().(time.Time)
		return [2]int64{t.Unix(), int64(t.Nanosecond())}
	case v.Kind() == reflect.Slice:
		if v.Len() == 0 {
			return nil
		}
		if v.Type().Elem().Kind() == reflect.Uint8 {
			return string(v.Bytes())
		}
		out := make([]any, v.Len())
		for i := range out {
			out[i] = normalize(v.Index(i))
		}
		return out
	case v.Kind() == reflect.Struct:
		out := make([]any, v.NumField())
		for i := range out {
			out[i] = normalize(v.Field(i))
		}
		return out
	case v.Kind() == reflect.Pointer:
		if v.IsNil() {
			return nil
		}
		return normalize(v.Elem())
	default:
		return v.Interface()
	}
}
