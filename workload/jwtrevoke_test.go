package workload_test

import (
	"context"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
)

// stepClock is a clock the test moves forward by whole steps.
type stepClock struct{ offset atomic.Int64 }

func (c *stepClock) now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *stepClock) advance(d time.Duration) { c.offset.Add(int64(d)) }

// TestValidateRefusesJWTsOfRevokedIdentities: through go-spiffe's client,
// ValidateJWTSVID refuses a token whose identity was revoked, or whose
// entry was deleted, after it was issued; other identities' tokens and
// tokens issued after the identity was registered again still validate.
func TestValidateRefusesJWTsOfRevokedIdentities(t *testing.T) {
	clock := &stepClock{}
	h := startServer(t, controlplane.Config{Now: clock.now})
	pid := pidSelector(os.Getpid())
	h.entry(t, idA, pid)
	entryB := h.entry(t, idB, pid)
	h.entry(t, idC, pid)
	ctx := testCtx(t)
	c := h.client(t)
	svids, err := c.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatal(err)
	}
	tokens := map[string]string{}
	for _, s := range svids {
		tokens[s.ID.String()] = s.Marshal()
	}
	for id, tok := range tokens {
		if _, err := c.ValidateJWTSVID(ctx, tok, "db"); err != nil {
			t.Fatalf("%s before any revocation: %v", id, err)
		}
	}

	if _, err := h.srv.Revoke(context.Background(), idA, "", "test"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.srv.DeleteEntry(context.Background(), entryB, "test"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{idA, idB} {
		if _, err := c.ValidateJWTSVID(ctx, tokens[id], "db"); status.Code(err) != codes.InvalidArgument {
			t.Errorf("token of revoked %s: %v, want InvalidArgument", id, err)
		}
	}
	if _, err := c.ValidateJWTSVID(ctx, tokens[idC], "db"); err != nil {
		t.Errorf("token of untouched %s: %v", idC, err)
	}

	// Registered again later: its new tokens are good.
	clock.advance(2 * time.Second)
	h.entry(t, idB, pid)
	fresh, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db", Subject: mustID(idB)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ValidateJWTSVID(ctx, fresh.Marshal(), "db"); err != nil {
		t.Fatalf("token issued after %s was registered again: %v", idB, err)
	}
}
