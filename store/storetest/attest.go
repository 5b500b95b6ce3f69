package storetest

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// tokenUnspent checks that hash is still redeemable on a connection it was
// never used on, i.e. that nothing spent or bound it.
func tokenUnspent(t *testing.T, s store.Store, what, hash string, now time.Time) {
	t.Helper()
	tk, err := s.PeekToken(bg, hash, now, "a-connection-never-used")
	if err != nil || !tk.UsedAt.IsZero() || tk.BoundTo != "" {
		t.Fatalf("%s: the token is no longer unspent: %+v, %v", what, tk, err)
	}
}

func testAttestAgent(t *testing.T, s store.Store) {
	id := "spiffe://example.org/meshid/agent/join/n1"
	must(t, s.CreateToken(bg, token("at", id, true), nop))
	now := t0.Add(time.Minute)

	// PeekToken redeems nothing.
	before := snapshot(t, s)
	for range 2 {
		tk, err := s.PeekToken(bg, "at", now, "c1")
		must(t, err)
		if tk.SpiffeID != id || !tk.UsedAt.IsZero() {
			t.Fatalf("PeekToken = %+v", tk)
		}
	}
	if after := snapshot(t, s); !reflect.DeepEqual(before, after) {
		t.Fatalf("PeekToken changed the store: %+v -> %+v", before, after)
	}
	_, err := s.PeekToken(bg, "at", t0.Add(time.Hour), "c1")
	wantErr(t, "PeekToken at expiry", err, store.ErrNotFound)
	_, err = s.PeekToken(bg, "at", now, "")
	wantErr(t, "PeekToken of a single-use token without a connection", err, store.ErrNotFound)

	attest := func(hash string, at time.Time, conn string, fn func(store.JoinToken, *store.AgentRecord, bool) error) error {
		_, _, err := s.AttestAgent(bg, hash, at, conn, id, fn, &store.AuditEvent{Time: at, Actor: id, Action: "agent.attest", Target: id})
		return err
	}
	set := func(tk store.JoinToken, r *store.AgentRecord, exists bool) error {
		if tk.SpiffeID != id {
			return errors.New("token for another agent")
		}
		if !exists {
			r.FirstSeen = now
		}
		r.Method, r.Node, r.LastSeen = "join_token", "n1", now
		r.NodeSVIDs = []store.AgentSVID{{Serial: "0a", NotAfter: now.Add(time.Hour)}}
		return nil
	}

	// A failure leaves both the token and the record as they were.
	errRefused := errors.New("refused")
	agentsUnchanged(t, s, "AttestAgent whose fn fails after editing", errRefused, func() error {
		return attest("at", now, "c1", func(tk store.JoinToken, r *store.AgentRecord, exists bool) error {
			if err := set(tk, r, exists); err != nil {
				return err
			}
			return errRefused
		})
	})
	tokenUnspent(t, s, "after fn failed", "at", now)
	agentsUnchanged(t, s, "AttestAgent whose fn changes the id", store.ErrInvalid, func() error {
		return attest("at", now, "c1", func(_ store.JoinToken, r *store.AgentRecord, _ bool) error { r.ID = "other"; return nil })
	})
	tokenUnspent(t, s, "after an invalid record", "at", now)
	agentsUnchanged(t, s, "AttestAgent with a record that fails validation", store.ErrInvalid, func() error {
		return attest("at", now, "c1", func(_ store.JoinToken, r *store.AgentRecord, _ bool) error {
			r.NodeSVIDs = []store.AgentSVID{{Serial: ""}}
			return nil
		})
	})
	tokenUnspent(t, s, "after an invalid node SVID", "at", now)
	called := false
	noCall := func(store.JoinToken, *store.AgentRecord, bool) error { called = true; return nil }
	agentsUnchanged(t, s, "AttestAgent with an unknown token", store.ErrNotFound, func() error { return attest("zz", now, "c1", noCall) })
	agentsUnchanged(t, s, "AttestAgent with an expired token", store.ErrNotFound, func() error { return attest("at", t0.Add(time.Hour), "c1", noCall) })
	agentsUnchanged(t, s, "AttestAgent without a connection", store.ErrNotFound, func() error { return attest("at", now, "", noCall) })
	cancelled, stop := context.WithCancel(bg)
	stop()
	agentsUnchanged(t, s, "AttestAgent with a cancelled context", context.Canceled, func() error {
		_, _, err := s.AttestAgent(cancelled, "at", now, "c1", id, set, nil)
		return err
	})
	if called {
		t.Fatal("AttestAgent called fn for a token it refused")
	}
	tokenUnspent(t, s, "after refusals", "at", now)

	// Success: the token spent and bound, the record written, the audit
	// event appended, all in one watched commit.
	rev0, err := s.Revision(bg)
	must(t, err)
	ctx, cancel := context.WithCancel(bg)
	w, err := s.Watch(ctx, rev0)
	must(t, err)
	defer func() {
		cancel()
		for range w.Responses() {
		}
	}()
	tk, rec, err := s.AttestAgent(bg, "at", now, "c1", id, set, &store.AuditEvent{Time: now, Actor: id, Action: "agent.attest", Target: id})
	must(t, err)
	if !tk.UsedAt.Equal(now) || tk.BoundTo != "c1" || rec.ID != id || rec.Node != "n1" || len(rec.NodeSVIDs) != 1 {
		t.Fatalf("AttestAgent = %+v, %+v", tk, rec)
	}
	if got, err := s.GetAgent(bg, id); err != nil || !reflect.DeepEqual(got, rec) {
		t.Fatalf("GetAgent after AttestAgent = %+v, %v; want %+v", got, err, rec)
	}
	if ev, err := s.ListAudit(bg, 1); err != nil || len(ev) != 1 || ev[0].Action != "agent.attest" {
		t.Fatalf("AttestAgent's audit event: %+v, %v", ev, err)
	}
	r := recv(t, w)
	if len(r.Events) != 2 || r.Events[0].Kind != store.KindToken || r.Events[0].Token == nil || r.Events[0].Token.BoundTo != "c1" ||
		r.Events[1].Kind != store.KindAgent || r.Events[1].Agent == nil || r.Events[1].Agent.ID != id {
		t.Fatalf("AttestAgent's watch response = %+v, want the token then the agent in one commit", r)
	}
	for _, ev := range r.Events {
		if ev.Revision != r.Revision {
			t.Fatalf("event revision %d in a response of revision %d", ev.Revision, r.Revision)
		}
	}
	if rev, err := s.Revision(bg); err != nil || rev != r.Revision {
		t.Fatalf("Revision = %d, %v; want %d", rev, err, r.Revision)
	}

	// Spent: another connection is refused and the record stays.
	agentsUnchanged(t, s, "AttestAgent with a spent token", store.ErrNotFound, func() error { return attest("at", now, "c2", noCall) })
	if called {
		t.Fatal("AttestAgent called fn for a spent token")
	}
	_, err = s.PeekToken(bg, "at", now, "c2")
	wantErr(t, "PeekToken of a spent token", err, store.ErrNotFound)

	// A banned agent's new token is not spent by a refused attestation.
	must(t, s.CreateToken(bg, token("at2", id, true), nop))
	_, err = s.UpdateAgent(bg, id, func(r *store.AgentRecord, _ bool) error { r.Banned = true; return nil }, nil)
	must(t, err)
	errBanned := errors.New("banned")
	agentsUnchanged(t, s, "AttestAgent of a banned agent", errBanned, func() error {
		return attest("at2", now, "c3", func(_ store.JoinToken, r *store.AgentRecord, exists bool) error {
			if exists && r.Banned {
				return errBanned
			}
			return nil
		})
	})
	tokenUnspent(t, s, "after a banned agent's attestation", "at2", now)
}

// testAttestAgentRace: concurrent attestations with one single-use token
// on different connections: exactly one writes the record.
func testAttestAgentRace(t *testing.T, s store.Store) {
	id := "spiffe://example.org/meshid/agent/join/race"
	must(t, s.CreateToken(bg, token("race", id, true), nop))
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			_, _, errs[i] = s.AttestAgent(bg, "race", t0, "conn-"+string(rune('a'+i)), id, func(_ store.JoinToken, r *store.AgentRecord, _ bool) error {
				r.Node = string(rune('a' + i))
				return nil
			}, nil)
		})
	}
	wg.Wait()
	wins := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if wins >= 0 {
				t.Fatalf("two attestations with one single-use token succeeded (%d and %d)", wins, i)
			}
			wins = i
		case !errors.Is(err, store.ErrNotFound):
			t.Fatalf("AttestAgent: %v", err)
		}
	}
	if wins < 0 {
		t.Fatal("no attestation succeeded")
	}
	rec, err := s.GetAgent(bg, id)
	must(t, err)
	if rec.Node != string(rune('a'+wins)) {
		t.Fatalf("record written by %q, the winner was %q", rec.Node, string(rune('a'+wins)))
	}
}
