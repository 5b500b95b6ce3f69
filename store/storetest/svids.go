package storetest

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func testSVIDs(t *testing.T, s store.Store) {
	rows := []store.IssuedSVID{svid(3, t0.Add(3*time.Hour)), svid(1, t0.Add(time.Hour)), svid(2, t0.Add(time.Hour)), svid(4, t0.Add(4*time.Hour))}
	rows[1].EntryID = "" // an admin mint
	for _, r := range rows {
		must(t, s.RecordSVID(bg, r))
	}
	unchanged(t, s, "RecordSVID duplicate serial", store.ErrAlreadyExists, func() error {
		return s.RecordSVID(bg, svid(3, t0.Add(9*time.Hour)))
	})
	unchanged(t, s, "RecordSVID empty serial", store.ErrInvalid, func() error {
		r := svid(5, t0)
		r.Serial = ""
		return s.RecordSVID(bg, r)
	})
	unchanged(t, s, "RecordSVID no NotAfter", store.ErrInvalid, func() error {
		return s.RecordSVID(bg, svid(6, time.Time{}))
	})
	got, next, err := s.ListSVIDs(bg, store.SVIDQuery{})
	must(t, err)
	// By NotAfter, then serial.
	if want := []store.IssuedSVID{rows[1], rows[2], rows[0], rows[3]}; next != "" || !reflect.DeepEqual(got, want) {
		t.Fatalf("ListSVIDs = %+v (next %q), want %+v", got, next, want)
	}
	got, _, err = s.ListSVIDs(bg, store.SVIDQuery{NotExpiredAt: t0.Add(time.Hour), ExpiringBefore: t0.Add(3 * time.Hour)})
	must(t, err)
	if len(got) != 1 || got[0].Serial != rows[0].Serial {
		t.Fatalf("window (1h, 3h] = %+v, want only serial %s", got, rows[0].Serial)
	}
	n, err := s.PruneSVIDs(bg, t0.Add(3*time.Hour))
	must(t, err)
	if n != 2 {
		t.Fatalf("PruneSVIDs = %d, want 2 (NotAfter 1h twice; 3h is not before the cutoff)", n)
	}
	got, _, _ = s.ListSVIDs(bg, store.SVIDQuery{})
	if len(got) != 2 || got[0].Serial != rows[0].Serial || got[1].Serial != rows[3].Serial {
		t.Fatalf("after prune: %+v", got)
	}
	// A pruned serial is gone, so it can be recorded again.
	must(t, s.RecordSVID(bg, rows[1]))
}

func testSVIDPaging(t *testing.T, s store.Store) {
	const n = 41
	for i := range n {
		must(t, s.RecordSVID(bg, svid(i, t0.Add(time.Duration(i%9)*time.Minute))))
	}
	all, _, err := s.ListSVIDs(bg, store.SVIDQuery{})
	must(t, err)
	if len(all) != n {
		t.Fatalf("ListSVIDs = %d rows, want %d", len(all), n)
	}
	from := t0.Add(2 * time.Minute)
	var window []store.IssuedSVID
	for _, r := range all {
		if r.NotAfter.After(from) {
			window = append(window, r)
		}
	}
	for _, size := range []int{1, 4, n} {
		for _, q := range []store.SVIDQuery{{}, {NotExpiredAt: from}} {
			want := all
			if !q.NotExpiredAt.IsZero() {
				want = window
			}
			var got []store.IssuedSVID
			q.PageSize = size
			for pages := 0; ; pages++ {
				if pages > n+1 {
					t.Fatalf("page size %d: no end", size)
				}
				rows, next, err := s.ListSVIDs(bg, q)
				must(t, err)
				if len(rows) > size {
					t.Fatalf("page size %d: got %d rows", size, len(rows))
				}
				got = append(got, rows...)
				if next == "" {
					break
				}
				q.PageToken = next
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("page size %d, query %+v: pages joined differ from the unpaged list", size, q)
			}
		}
	}
	_, _, err = s.ListSVIDs(bg, store.SVIDQuery{PageSize: -1})
	wantErr(t, "ListSVIDs negative page size", err, store.ErrInvalid)
	_, _, err = s.ListSVIDs(bg, store.SVIDQuery{PageToken: "%%not a token%%"})
	wantErr(t, "ListSVIDs malformed page token", err, store.ErrInvalid)
}

func testAudit(t *testing.T, s store.Store) {
	for i := range 5 {
		must(t, s.AppendAudit(bg, auditFor("svid.mint", fmt.Sprint(i))))
	}
	ev, err := s.ListAudit(bg, 0)
	must(t, err)
	if len(ev) != 5 || ev[0].Target != "4" || ev[4].Target != "0" {
		t.Fatalf("ListAudit = %+v, want 5 events newest first", ev)
	}
	if !reflect.DeepEqual(ev[0], auditFor("svid.mint", "4")) {
		t.Fatalf("audit event read back as %+v", ev[0])
	}
	ev, err = s.ListAudit(bg, 2)
	must(t, err)
	if len(ev) != 2 || ev[0].Target != "4" || ev[1].Target != "3" {
		t.Fatalf("ListAudit(2) = %+v", ev)
	}
	// A zero time is stamped by the store.
	must(t, s.AppendAudit(bg, store.AuditEvent{Actor: "x", Action: "y"}))
	if ev, _ := s.ListAudit(bg, 1); len(ev) != 1 || ev[0].Time.IsZero() {
		t.Fatalf("zero-time event read back as %+v", ev)
	}
	_, err = s.ListAudit(bg, -1)
	wantErr(t, "ListAudit negative limit", err, store.ErrInvalid)
}
