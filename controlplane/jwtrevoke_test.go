package controlplane

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

// TestJWTRevocationSurvivesRestartAndExpires: the refusal of a revoked
// identity's JWT-SVIDs is kept across a restart, and forgotten once every
// token it could refuse has expired.
func TestJWTRevocationSurvivesRestartAndExpires(t *testing.T) {
	var offset atomic.Int64
	cfg := Config{DataDir: t.TempDir(), JWTTTL: 5 * time.Minute, Now: func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }}
	ts := startServer(t, cfg)
	ctx := context.Background()
	const id = "spiffe://cluster.local/ns/x/sa/jwt"
	if _, err := ts.srv.CreateEntry(ctx, EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: "uid:6001"}}}, "test"); err != nil {
		t.Fatal(err)
	}
	toks, err := ts.srv.MintJWTSVID(ctx, identity.Caller{Selectors: []string{"unix:uid:6001"}}, []string{"db"}, "")
	if err != nil {
		t.Fatal(err)
	}
	jb, err := ts.srv.jwtBundle()
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := jwtbundle.Parse(ts.srv.td, jb.JWKS)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := jwtsvid.ParseAndValidate(toks[0].Token, bundle, []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	iat := time.Unix(int64(svid.Claims["iat"].(float64)), 0)
	if err := ts.srv.CheckJWTSVID(ctx, svid.ID, iat); err != nil {
		t.Fatalf("before revocation: %v", err)
	}
	if _, err := ts.srv.Revoke(ctx, id, "", "test"); err != nil {
		t.Fatal(err)
	}
	ts.stop()
	ts = startServer(t, cfg)
	if err := ts.srv.CheckJWTSVID(ctx, svid.ID, iat); err == nil {
		t.Fatal("a revoked identity's JWT-SVID is accepted again after a restart")
	}
	offset.Add(int64(cfg.JWTTTL + 2*time.Minute))
	_ = ts.srv.CheckJWTSVID(ctx, svid.ID, iat)
	ts.srv.jwtRev.mu.Lock()
	left := len(ts.srv.jwtRev.cutoff)
	ts.srv.jwtRev.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d revocation cut-offs kept after every token they refuse has expired", left)
	}
}
