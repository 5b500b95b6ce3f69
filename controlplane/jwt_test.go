package controlplane

import (
	"context"
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

func TestMintJWTSVID(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir})
	ctx := context.Background()
	for _, id := range []string{"spiffe://cluster.local/ns/a/sa/one", "spiffe://cluster.local/ns/a/sa/two"} {
		if _, err := ts.srv.CreateEntry(ctx, EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: "uid:42"}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	caller := identity.Caller{Selectors: []string{"unix:uid:42"}}
	jb, err := ts.srv.jwtBundle()
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := jwtbundle.Parse(ts.srv.td, jb.JWKS)
	if err != nil {
		t.Fatalf("JWT bundle is not a valid SPIFFE JWKS: %v", err)
	}

	all, err := ts.srv.MintJWTSVID(ctx, caller, []string{"db"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[0].ID.String() != "spiffe://cluster.local/ns/a/sa/one" || all[1].Hint == "" {
		t.Fatalf("one JWT per identity, default first: %+v", all)
	}
	for _, j := range all {
		got, err := jwtsvid.ParseAndValidate(j.Token, bundle, []string{"db"})
		if err != nil || got.ID != j.ID {
			t.Fatalf("JWT-SVID for %s does not validate with the JWT bundle: %v", j.ID, err)
		}
	}
	one, err := ts.srv.MintJWTSVID(ctx, caller, []string{"db"}, "spiffe://cluster.local/ns/a/sa/two")
	if err != nil || len(one) != 1 || one[0].ID.String() != "spiffe://cluster.local/ns/a/sa/two" {
		t.Fatalf("JWT for a named identity: %+v %v", one, err)
	}
	if _, err := ts.srv.MintJWTSVID(ctx, caller, []string{"db"}, "spiffe://cluster.local/ns/other/sa/x"); !errors.Is(err, identity.ErrNotEntitled) {
		t.Fatalf("JWT for someone else's identity: %v", err)
	}
	if _, err := ts.srv.MintJWTSVID(ctx, identity.Caller{Selectors: []string{"unix:uid:7"}}, []string{"db"}, ""); !errors.Is(err, identity.ErrNotEntitled) {
		t.Fatalf("JWT for a caller without identity: %v", err)
	}
	var inv *InvalidArgumentError
	if _, err := ts.srv.MintJWTSVID(ctx, caller, nil, ""); !errors.As(err, &inv) {
		t.Fatalf("JWT without audience: %v", err)
	}

	// The key survives a restart: tokens minted before still validate.
	ts.stop()
	ts = startServer(t, Config{DataDir: dir})
	jb2, err := ts.srv.jwtBundle()
	if err != nil {
		t.Fatal(err)
	}
	if string(jb2.JWKS) != string(jb.JWKS) {
		t.Fatal("JWT bundle changed across a restart")
	}
}
