package controlplane

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

// TestVerifierRPCsMintNothing: a workload entitled to an SVID that only
// verifies (FetchX509Bundles, FetchJWTBundles, ValidateJWTSVID) gets the
// bundles without an SVID being signed for it: no inventory row, no sign.
func TestVerifierRPCsMintNothing(t *testing.T) {
	srv := openServer(t)
	const id = "spiffe://cluster.local/ns/default/sa/verifier"
	entryFor(t, srv, id, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	l := runEndpoints(t, srv, Endpoints{
		AdminSocket: filepath.Join(shortTemp(t), "admin.sock"),
		Socket:      filepath.Join(shortTemp(t), "workload.sock"),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr := workloadapi.WithAddr("unix://" + l.Socket)

	rows := func() int {
		t.Helper()
		got, _, err := srv.Store().ListSVIDs(ctx, store.SVIDQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return len(got)
	}
	before := rows()

	xb, err := workloadapi.FetchX509Bundles(ctx, addr)
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	if _, ok := xb.Get(srv.TrustDomain()); !ok {
		t.Fatal("no X.509 bundle for the trust domain")
	}
	jb, err := workloadapi.FetchJWTBundles(ctx, addr)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, ok := jb.Get(srv.TrustDomain()); !ok {
		t.Fatal("no JWT bundle for the trust domain")
	}
	toks, err := srv.MintJWTSVID(ctx, identity.Caller{IDs: []spiffeid.ID{spiffeid.RequireFromString(id)}}, []string{"aud"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := workloadapi.ValidateJWTSVID(ctx, toks[0].Token, "aud", addr); err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if got := rows(); got != before {
		t.Fatalf("verifier RPCs left %d inventory rows, had %d: they signed SVIDs", got, before)
	}

	// The same caller asking for its SVID is signed one: the count above
	// would have seen it.
	if _, err := workloadapi.FetchX509SVID(ctx, addr); err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	if got := rows(); got != before+1 {
		t.Fatalf("FetchX509SVID left %d rows, want %d", got, before+1)
	}
}
