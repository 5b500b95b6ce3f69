package storetest

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func signedCRLs(n int64) store.SignedCRLs {
	return store.SignedCRLs{
		Covers: "ca-1,0a;", Number: n, SignedAt: t0, RefreshAt: t0.Add(12 * time.Hour),
		DER: [][]byte{{0x30, 0x01, byte(n)}, {0x30, 0x02}},
	}
}

// testSignedCRLs: the set is absent until put, a put replaces it whole
// and is watched, and what cannot be served is refused without a change.
func testSignedCRLs(t *testing.T, s store.Store) {
	if _, err := s.GetCRLs(bg); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetCRLs on an empty store: %v, want ErrNotFound", err)
	}
	rev0, err := s.Revision(bg)
	must(t, err)
	w, err := s.Watch(bg, rev0)
	must(t, err)
	for _, n := range []int64{7, 8} {
		c := signedCRLs(n)
		must(t, s.PutCRLs(bg, c))
		got, err := s.GetCRLs(bg)
		must(t, err)
		if !reflect.DeepEqual(got, c) {
			t.Fatalf("GetCRLs after put %d = %+v, want %+v", n, got, c)
		}
		r := recv(t, w)
		if len(r.Events) != 1 || r.Events[0].Kind != store.KindCRLs || r.Events[0].Op != store.OpPut || r.Revision <= rev0 {
			t.Fatalf("watch after put %d: %+v, want one put of kind %q above revision %d", n, r, store.KindCRLs, rev0)
		}
		// The event leaves the CRLs out: a watch log stays small.
		want := c
		want.DER, want.Covers = nil, ""
		if ev := r.Events[0]; ev.CRLs == nil || !reflect.DeepEqual(*ev.CRLs, want) || ev.Revision != r.Revision {
			t.Fatalf("watched set after put %d = %+v, want %+v at revision %d", n, ev.CRLs, want, r.Revision)
		}
		rev0 = r.Revision
	}
	bad := map[string]store.SignedCRLs{
		"no CRL":        {Number: 9, RefreshAt: t0},
		"an empty CRL":  {Number: 9, RefreshAt: t0, DER: [][]byte{{0x30}, nil}},
		"number 0":      {RefreshAt: t0, DER: [][]byte{{0x30}}},
		"no refresh at": {Number: 9, DER: [][]byte{{0x30}}},
	}
	for what, c := range bad {
		wantErr(t, "PutCRLs with "+what, s.PutCRLs(bg, c), store.ErrInvalid)
	}
	got, err := s.GetCRLs(bg)
	must(t, err)
	if !reflect.DeepEqual(got, signedCRLs(8)) {
		t.Fatalf("refused puts changed the set: %+v", got)
	}
	if rev, err := s.Revision(bg); err != nil || rev != rev0 {
		t.Fatalf("revision after refused puts = %d, %v; want %d", rev, err, rev0)
	}
}
