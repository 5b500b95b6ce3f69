package controlplane

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/store"
)

// TestTwoAutomaticRotationsOnFakeClock crosses two automatic CA rotations
// in fake time (CA 24 h, SVID 1 h) in small steps. At every step each
// workload's current SVID must verify, at the fake time, against the bundle
// the other workload holds; the lifecycle steps must fire exactly when the
// rules say (prepare at half the active CA's life, activate at two thirds
// and not before the prepared CA has been published for 2 x SVID TTL); and
// the first CA must stay in the bundle until its last SVID expires and
// leave it right after. The real-time soak of the same story, with TLS
// handshakes, is TestHandshakesThroughTwoAutomaticRotations.
func TestTwoAutomaticRotationsOnFakeClock(t *testing.T) {
	const svidTTL, caTTL = time.Hour, 24 * time.Hour
	fc := fakeclock.New(time.Now())
	ts := startServer(t, Config{SVIDTTL: svidTTL, CATTL: caTTL, Now: fc.Now, AfterFunc: fc.AfterFunc})
	ctx := context.Background()
	idA, idB := "spiffe://cluster.local/ns/a/sa/server", "spiffe://cluster.local/ns/b/sa/client"
	for id, sel := range map[string]string{idA: "uid:1001", idB: "uid:1002"} {
		if _, err := ts.srv.CreateEntry(ctx, EntrySpec{SpiffeID: id, Selectors: []store.Selector{{Type: "unix", Value: sel}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	subA, err := ts.srv.Subscribe(ctx, identity.Caller{Selectors: []string{"unix:uid:1001"}})
	if err != nil {
		t.Fatal(err)
	}
	defer subA.Close()
	subB, err := ts.srv.Subscribe(ctx, identity.Caller{Selectors: []string{"unix:uid:1002"}})
	if err != nil {
		t.Fatal(err)
	}
	defer subB.Close()
	firstCA := ts.srv.BundleCerts()[0]
	firstID := ts.srv.activeID

	// lastFromFirst is the latest NotAfter seen on an SVID the first CA
	// signed: the first CA must be in both bundles until then.
	var lastFromFirst time.Time
	signers := map[string]bool{}
	// check is what a handshake between A and B decides, at fake time.
	check := func(holder, peer subSource, peerID string) {
		t.Helper()
		svid, err := peer.GetX509SVID()
		if err != nil {
			t.Fatalf("at +%s: %s has no SVID: %v", fc.Now().Sub(ts.srv.startedAt), peerID, err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, holder, x509svid.WithTime(fc.Now())); err != nil {
			t.Fatalf("at +%s: %s's SVID does not verify against its peer's bundle: %v", fc.Now().Sub(ts.srv.startedAt), peerID, err)
		}
		if svid.ID != spiffeid.RequireFromString(peerID) {
			t.Fatalf("%s holds an SVID for %s", peerID, svid.ID)
		}
		leaf := svid.Certificates[0]
		signers[string(leaf.AuthorityKeyId)] = true
		if leaf.CheckSignatureFrom(firstCA) == nil && leaf.NotAfter.After(lastFromFirst) {
			lastFromFirst = leaf.NotAfter
		}
	}
	const step = svidTTL / 20
	var firstLeftAt time.Time
	for fc.Now().Sub(ts.srv.startedAt) < 2*caTTL {
		check(subSource{subA}, subSource{subB}, idB)
		check(subSource{subB}, subSource{subA}, idA)
		inBundle := containsCert(ts.srv.BundleCerts(), firstCA) &&
			containsCert(subA.Snapshot().Bundles[0].X509Authorities, firstCA) &&
			containsCert(subB.Snapshot().Bundles[0].X509Authorities, firstCA)
		if !inBundle && firstLeftAt.IsZero() {
			firstLeftAt = fc.Now()
			if firstLeftAt.Before(lastFromFirst) {
				t.Fatalf("first CA left a bundle at %s, before its last SVID expired at %s", firstLeftAt, lastFromFirst)
			}
		}
		if activations(t, ts.srv) >= 2 && !firstLeftAt.IsZero() && len(signers) == 3 {
			break
		}
		fc.Advance(step)
	}
	if firstLeftAt.IsZero() {
		t.Fatal("the first CA never left the bundle")
	}
	// It leaves on the lifecycle tick right after its last SVID expired,
	// so within one step of it.
	if firstLeftAt.Sub(lastFromFirst) > step {
		t.Fatalf("first CA left the bundle %s after its last SVID expired, want within %s", firstLeftAt.Sub(lastFromFirst), step)
	}
	if len(signers) != 3 {
		t.Fatalf("SVIDs came from %d CAs, want 3", len(signers))
	}

	// The lifecycle steps happened at exactly the times the rules give,
	// computed here from the CA certificates.
	ev, err := ts.srv.store.ListAudit(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortStableFunc(ev, func(a, b store.AuditEvent) int { return a.Time.Compare(b.Time) })
	frac := func(id string, f float64) time.Time {
		v := ts.srv.caByID(id)
		if v == nil {
			t.Fatalf("no CA %s", id)
		}
		return v.rec.CreatedAt.Add(time.Duration(float64(v.cert.NotAfter.Sub(v.rec.CreatedAt)) * f))
	}
	active := firstID
	var prepared string
	var preparedAt time.Time
	var steps int
	for _, e := range ev {
		switch e.Action {
		case "ca.prepare":
			if want := frac(active, 0.5); !e.Time.Equal(want) {
				t.Errorf("prepared %s at %s, want %s (half of %s's life)", e.Target, e.Time, want, active)
			}
			prepared, preparedAt = e.Target, e.Time
			steps++
		case "ca.activate":
			want := frac(active, 2.0/3)
			if safe := preparedAt.Add(2 * svidTTL); safe.After(want) {
				want = safe
			}
			if e.Target != prepared || !e.Time.Equal(want) {
				t.Errorf("activated %s at %s, want %s at %s", e.Target, e.Time, prepared, want)
			}
			active = e.Target
			steps++
		}
	}
	if steps != 4 {
		t.Fatalf("%d prepare/activate steps in the audit log, want 4", steps)
	}
}
