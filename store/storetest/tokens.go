package storetest

import (
	"errors"
	"fmt"
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
		got, err := s.UseToken(bg, "aa", now, "c1")
		must(t, err)
		if !reflect.DeepEqual(got, multi) {
			t.Fatalf("use %d of the reusable token = %+v, want %+v (the duplicate create must not have replaced it)", i, got, multi)
		}
	}
	_, err := s.UseToken(bg, "bb", now, "")
	wantErr(t, "single-use token without a connection to bind", err, store.ErrNotFound)
	got, err := s.UseToken(bg, "bb", now, "conn-1")
	must(t, err)
	if got.SpiffeID != single.SpiffeID || !got.UsedAt.Equal(now) || got.BoundTo != "conn-1" {
		t.Fatalf("single-use redemption = %+v, want UsedAt %s, bound to conn-1", got, now)
	}
	_, err = s.UseToken(bg, "bb", now, "conn-2")
	wantErr(t, "a single-use token on another connection", err, store.ErrNotFound)
	// Its own connection presents it again (Envoy: one stream per secret).
	again, err := s.UseToken(bg, "bb", now.Add(time.Second), "conn-1")
	must(t, err)
	if !again.UsedAt.Equal(now) || again.BoundTo != "conn-1" {
		t.Fatalf("re-use on the bound connection = %+v: the first use must stay recorded", again)
	}
	_, err = s.UseToken(bg, "aa", multi.ExpiresAt, "c1")
	wantErr(t, "UseToken at expiry", err, store.ErrNotFound)
	_, err = s.UseToken(bg, "zz", now, "c1")
	wantErr(t, "UseToken unknown", err, store.ErrNotFound)

	n, err := s.DeleteTokensFor(bg, "spiffe://example.org/proxy")
	must(t, err)
	if n != 2 {
		t.Fatalf("DeleteTokensFor = %d, want 2", n)
	}
	_, err = s.UseToken(bg, "aa", now, "c1")
	wantErr(t, "UseToken deleted", err, store.ErrNotFound)
	if _, err := s.UseToken(bg, "cc", now, ""); err != nil {
		t.Fatalf("another identity's token went too: %v", err)
	}
}

func testTokenSingleUseRace(t *testing.T, s store.Store) {
	must(t, s.CreateToken(bg, token("once", "spiffe://example.org/p", true), nop))
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { _, errs[i] = s.UseToken(bg, "once", t0, fmt.Sprintf("conn-%d", i)) })
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
		t.Fatalf("%d concurrent redemptions of a single-use token on different connections succeeded, want 1", wins)
	}
	// Concurrent redemptions on one connection all pass: it is one holder.
	must(t, s.CreateToken(bg, token("one-conn", "spiffe://example.org/p", true), nop))
	for i := range n {
		wg.Go(func() { _, errs[i] = s.UseToken(bg, "one-conn", t0, "conn-x") })
	}
	wg.Wait()
	for _, err := range errs {
		must(t, err)
	}
}
