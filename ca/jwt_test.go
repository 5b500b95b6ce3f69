package ca

import (
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

func TestJWTSVIDValidatesWithGoSPIFFE(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	now := time.Now()
	j, err := NewJWTAuthority(td, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	b := jwtbundle.New(td)
	b.AddJWTAuthority(j.KeyID, j.Key.Public())
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	tok, exp, err := j.MintJWTSVID(id, []string{"db"}, 0, now)
	if err != nil {
		t.Fatal(err)
	}
	if got := exp.Sub(now); got > DefaultJWTTTL || got < DefaultJWTTTL-time.Second {
		t.Fatalf("default exp in %s, want %s", got, DefaultJWTTTL)
	}
	svid, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"})
	if err != nil {
		t.Fatalf("go-spiffe rejects the JWT-SVID: %v", err)
	}
	if svid.ID != id {
		t.Fatalf("sub %s", svid.ID)
	}
	if _, err := jwtsvid.ParseAndValidate(tok, b, []string{"other"}); err == nil {
		t.Fatal("wrong audience accepted")
	}
	other, _ := NewJWTAuthority(td, time.Hour, now)
	ob := jwtbundle.New(td)
	ob.AddJWTAuthority(j.KeyID, other.Key.Public()) // same kid, different key: a forgery
	if _, err := jwtsvid.ParseAndValidate(tok, ob, []string{"db"}); err == nil {
		t.Fatal("token validated against the wrong key")
	}
	for _, bad := range []struct {
		id  spiffeid.ID
		aud []string
	}{
		{spiffeid.RequireFromString("spiffe://evil.example/x"), []string{"db"}},
		{id, nil},
		{id, []string{""}},
	} {
		if _, _, err := j.MintJWTSVID(bad.id, bad.aud, 0, now); err == nil {
			t.Errorf("minted for %s aud %q", bad.id, bad.aud)
		}
	}
	// Never beyond the key's own life.
	_, exp, err = j.MintJWTSVID(id, []string{"db"}, 2*time.Hour, now)
	if err != nil || exp.After(j.NotAfter) {
		t.Fatalf("exp %s beyond key %s (%v)", exp, j.NotAfter, err)
	}
}
