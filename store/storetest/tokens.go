package storetest

import (
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func token(hash, id string, single bool) store.JoinToken {
	return store.JoinToken{Hash: hash, SpiffeID: id, ExpiresAt: t0.Add(time.Hour), SingleUse: single, CreatedAt: t0}
}

func testTokens(t *testing.T, s store.Store) {
	multi := token("aa", "spiffe://example.org/proxy", false)
	single := token("bb", "spiffe://example.org/proxy", true)
	other := token("cc", "spiffe://example.org/other", false)
	for _, tk := range []store.JoinToken{multi, single, other} {
		must(t, s.CreateToken(bg, tk, auditFor("token.create", tk.SpiffeID)))
	}
	unchanged(t, s, "CreateToken duplicate hash", store.ErrAlreadyExists, func() error {
		return s.CreateToken(bg, token("aa", "spiffe://example.org/evil", false), nop)
	})
	unchanged(t, s, "CreateToken no expiry", store.ErrInvalid, func() error {
		tk := token("dd", "spiffe://example.org/x", false)
		tk.ExpiresAt = time.Time{}
		return s.CreateToken(bg, tk, nop)
	})
	now := t0.Add(time.Minute)
	for i := range 3 {
		got, err := s.UseToken(bg, "aa", now)
		must(t, err)
		if !reflect.DeepEqual(got, multi) {
			t.Fatalf("use %d of the reusable token = %+v, want %+v (the duplicate create must not have replaced it)", i, got, multi)
		}
	}
	got, err := s.UseToken(bg, "bb", now)
	must(t, err)
	if got.SpiffeID != single.SpiffeID || !got.UsedAt.Equal(now) {
		t.Fatalf("single-use redemption = %+v, want UsedAt %s", got, now)
	}
	_, err = s.UseToken(bg, "bb", now)
	wantErr(t, "second use of a single-use token", err, store.ErrNotFound)
	_, err = s.UseToken(bg, "aa", multi.ExpiresAt)
	wantErr(t, "UseToken at expiry", err, store.ErrNotFound)
	_, err = s.UseToken(bg, "zz", now)
	wantErr(t, "UseToken unknown", err, store.ErrNotFound)

	n, err := s.DeleteTokensFor(bg, "spiffe://example.org/proxy")
	must(t, err)
	if n != 2 {
		t.Fatalf("DeleteTokensFor = %d, want 2", n)
	}
	_, err = s.UseToken(bg, "aa", now)
	wantErr(t, "UseToken deleted", err, store.ErrNotFound)
	if _, err := s.UseToken(bg, "cc", now); err != nil {
		t.Fatalf("another identity's token went too: %v", err)
	}
}

func testTokenSingleUseRace(t *testing.T, s store.Store) {
	must(t, s.CreateToken(bg, token("once", "spiffe://example.org/p", true), nop))
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { _, errs[i] = s.UseToken(bg, "once", t0) })
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, store.ErrNotFound):
			t.Fatalf("UseToken: %v", err)
		}
	}
	if wins != 1 {
		t.Fatalf("%d concurrent redemptions of a single-use token succeeded, want 1", wins)
	}
}
