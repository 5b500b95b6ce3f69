package storetest

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func testCAs(t *testing.T, s store.Store) {
	a := store.CARecord{ID: "ca-b", Kind: "x509", State: store.CAPrepared, CertDER: []byte{1, 2}, ChainDER: [][]byte{{3}},
		SealedKey: []byte("k"), NotBefore: t0, NotAfter: t0.Add(time.Hour), CreatedAt: t0}
	b := store.CARecord{ID: "ca-a", Kind: "x509", State: store.CAActive, CertDER: []byte{4}, SealedKey: []byte("k"), CreatedAt: t0}
	j := store.CARecord{ID: "jwt-1", Kind: "jwt", State: store.CAActive, PublicKey: []byte("pkix"), SealedKey: []byte("k"), CreatedAt: t0.Add(-time.Minute)}
	must(t, s.PutCA(bg, a, nil))
	a2 := auditFor("ca.prepare", "ca-a")
	must(t, s.PutCA(bg, b, &a2))
	must(t, s.PutCA(bg, j, nil))
	got, err := s.ListCAs(bg)
	must(t, err)
	// Oldest CreatedAt first, ties by ID.
	if want := []store.CARecord{j, b, a}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListCAs = %+v, want %+v", got, want)
	}
	a.State = store.CAActive
	must(t, s.PutCA(bg, a, nil))
	got, _ = s.ListCAs(bg)
	if len(got) != 3 || got[2].State != store.CAActive {
		t.Fatalf("PutCA did not replace: %+v", got)
	}
	if ev, _ := s.ListAudit(bg, 0); len(ev) != 1 || ev[0].Action != "ca.prepare" {
		t.Fatalf("audit = %+v, want only the ca.prepare event", ev)
	}
	unchanged(t, s, "PutCA empty id", store.ErrInvalid, func() error {
		return s.PutCA(bg, store.CARecord{Kind: "x509"}, &a2)
	})

	// An activation: two records and two audit events in one commit, seen
	// by a watch as one response.
	rev, err := s.Revision(bg)
	must(t, err)
	a.State, b.State = store.CARetired, store.CAActive
	must(t, s.PutCAs(bg, []store.CARecord{b, a}, []store.AuditEvent{auditFor("ca.activate", "ca-a"), auditFor("ca.retire", "ca-b")}))
	got, _ = s.ListCAs(bg)
	if want := []store.CARecord{j, b, a}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after PutCAs ListCAs = %+v, want %+v", got, want)
	}
	if ev, _ := s.ListAudit(bg, 0); len(ev) != 3 {
		t.Fatalf("audit = %+v, want the two PutCAs events too", ev)
	}
	w, err := s.Watch(bg, rev)
	must(t, err)
	select {
	case resp := <-w.Responses():
		if len(resp.Events) != 2 || resp.Events[0].Key != "ca-a" || resp.Events[1].Key != "ca-b" {
			t.Fatalf("PutCAs watched as %+v, want one response with ca-a then ca-b", resp.Events)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("PutCAs not seen by a watch")
	}
	unchanged(t, s, "PutCAs with one empty id", store.ErrInvalid, func() error {
		c := b
		c.State = store.CARetired
		return s.PutCAs(bg, []store.CARecord{c, {Kind: "x509"}}, []store.AuditEvent{a2})
	})
}

func revoked(serial string, notAfter time.Time) store.RevokedSerial {
	return store.RevokedSerial{Serial: serial, CAID: "ca-1", SpiffeID: "spiffe://example.org/a", NotAfter: notAfter, RevokedAt: t0}
}

func testRevocations(t *testing.T, s store.Store) {
	r1, r2 := revoked("01", t0.Add(time.Hour)), revoked("02", t0.Add(3*time.Hour))
	must(t, s.RevokeSerials(bg, []store.RevokedSerial{r1, r2}, auditFor("svid.revoke", "a")))
	again := r1
	again.RevokedAt = t0.Add(time.Minute)
	r3 := revoked("03", t0.Add(2*time.Hour))
	must(t, s.RevokeSerials(bg, []store.RevokedSerial{again, r3}, nop))
	got, err := s.ListRevoked(bg)
	must(t, err)
	slices.SortFunc(got, func(a, b store.RevokedSerial) int { return strings.Compare(a.Serial, b.Serial) })
	if want := []store.RevokedSerial{r1, r2, r3}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ListRevoked = %+v, want %+v (a serial keeps its first record)", got, want)
	}
	unchanged(t, s, "RevokeSerials with one bad serial", store.ErrInvalid, func() error {
		return s.RevokeSerials(bg, []store.RevokedSerial{revoked("04", t0.Add(time.Hour)), revoked("", t0.Add(time.Hour))}, nop)
	})
	n, err := s.PruneRevoked(bg, t0.Add(2*time.Hour))
	must(t, err)
	if n != 1 {
		t.Fatalf("PruneRevoked = %d, want 1", n)
	}
	got, _ = s.ListRevoked(bg)
	if len(got) != 2 {
		t.Fatalf("after prune: %+v", got)
	}
}

func testCRLNumbers(t *testing.T, s store.Store) {
	next := func(ca string, floor int64) int64 {
		t.Helper()
		n, err := s.NextCRLNumber(bg, ca, floor)
		must(t, err)
		return n
	}
	if n := next("ca-1", 1000); n != 1000 {
		t.Fatalf("first number = %d, want the floor 1000", n)
	}
	if n := next("ca-1", 1000); n != 1001 {
		t.Fatalf("same floor again = %d, want 1001", n)
	}
	if n := next("ca-1", 5); n != 1002 {
		t.Fatalf("lower floor (clock stepped back) = %d, want 1002", n)
	}
	if n := next("ca-1", 5000); n != 5000 {
		t.Fatalf("higher floor = %d, want 5000", n)
	}
	if n := next("ca-2", 7); n != 7 {
		t.Fatalf("another CA = %d, want its own counter at 7", n)
	}
	_, err := s.NextCRLNumber(bg, "", 1)
	wantErr(t, "NextCRLNumber empty ca", err, store.ErrInvalid)
	_, err = s.NextCRLNumber(bg, "ca-1", -1)
	wantErr(t, "NextCRLNumber negative floor", err, store.ErrInvalid)
	if n := next("ca-1", 0); n != 5001 {
		t.Fatalf("after refused calls = %d, want 5001", n)
	}
}
