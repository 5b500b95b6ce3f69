package controlplane

import (
	"context"
	"crypto/tls"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// A join-token attestation spends the token and writes the agent record
// in one store transaction: the watch sees both changes at one revision.
// (They were two commits, each waiting on the store's one writer, which
// was most of an attestation with many agents attesting at once.)
func TestAgentAttestIsOneCommit(t *testing.T) {
	a := startAgentAPI(t)
	ctx := context.Background()
	tok := agentToken(t, a.srv, "one-commit")
	rev0, err := a.srv.store.Revision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := a.srv.store.Watch(wctx, rev0)
	if err != nil {
		t.Fatal(err)
	}
	_, id := a.attest(t, tok)
	hash := hashToken(tok)
	tokenRev, agentRev := int64(0), int64(0)
	for deadline := time.After(10 * time.Second); agentRev == 0; {
		select {
		case r := <-w.Responses():
			for _, ev := range r.Events {
				switch {
				case ev.Kind == store.KindToken && ev.Key == hash && ev.Token.BoundTo != "":
					tokenRev = ev.Revision
				case ev.Kind == store.KindAgent && ev.Key == id.String():
					agentRev = ev.Revision
				}
			}
		case <-deadline:
			t.Fatal("no watch event for the agent record")
		}
	}
	if tokenRev != agentRev {
		t.Fatalf("the token was spent at revision %d and the agent recorded at %d: two commits", tokenRev, agentRev)
	}
	rec, err := a.srv.store.GetAgent(ctx, id.String())
	if err != nil || len(rec.NodeSVIDs) != 1 || rec.Method != methodJoinToken {
		t.Fatalf("agent record %+v, %v", rec, err)
	}
}

// Attestations racing with one token: one gets a node SVID, the others
// PermissionDenied, and the record admits only the winner's.
func TestAgentAttestRaceOneToken(t *testing.T) {
	a := startAgentAPI(t)
	ctx := context.Background()
	tok := agentToken(t, a.srv, "race")
	const n = 6
	c := a.dial(t, nil)
	resps := make([]*agentv1.AttestResponse, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		_, csr := newKeyCSR(t, "")
		wg.Go(func() {
			resps[i], errs[i] = c.Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(tok), Csr: csr})
		})
	}
	wg.Wait()
	win := -1
	for i, err := range errs {
		if err == nil {
			if win >= 0 {
				t.Fatalf("attestations %d and %d both succeeded with one token", win, i)
			}
			win = i
			continue
		}
		wantCode(t, "a losing attestation", err, codes.PermissionDenied)
	}
	if win < 0 {
		t.Fatal("no attestation succeeded")
	}
	rec, err := a.srv.store.GetAgent(ctx, resps[win].GetSpiffeId())
	if err != nil {
		t.Fatal(err)
	}
	leaf := leafOf(t, &tls.Certificate{Certificate: resps[win].GetSvidChain()})
	if len(rec.NodeSVIDs) != 1 || rec.NodeSVIDs[0].Serial != leaf.SerialNumber.Text(16) {
		t.Fatalf("record lists %+v, the winner's node SVID is %s", rec.NodeSVIDs, leaf.SerialNumber.Text(16))
	}
}
