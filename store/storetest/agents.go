package storetest

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func agentRec(id, node string) store.AgentRecord {
	return store.AgentRecord{ID: id, Method: "join_token", Node: node, FirstSeen: t0, LastSeen: t0,
		NodeSVIDs: []store.AgentSVID{{Serial: "0a1b", NotAfter: t0.Add(time.Hour)}},
		Selectors: []string{"k8s_psat:cluster:c1", "k8s_psat:node-name:" + node}}
}

// agentsUnchanged is unchanged that also compares the agent records.
func agentsUnchanged(t *testing.T, s store.Store, what string, target error, call func() error) {
	t.Helper()
	before, err := s.ListAgents(bg)
	must(t, err)
	unchanged(t, s, what, target, call)
	after, err := s.ListAgents(bg)
	must(t, err)
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("%s failed but changed the agents:\nbefore %+v\nafter  %+v", what, before, after)
	}
}

func testAgents(t *testing.T, s store.Store) {
	if list, err := s.ListAgents(bg); err != nil || len(list) != 0 {
		t.Fatalf("ListAgents on an empty store = %v, %v; want none", list, err)
	}
	_, err := s.GetAgent(bg, "spiffe://example.org/meshid/agent/join/a")
	wantErr(t, "GetAgent on an empty store", err, store.ErrNotFound)

	rev0, err := s.Revision(bg)
	must(t, err)
	ctx, cancel := context.WithCancel(bg)
	w, err := s.Watch(ctx, rev0)
	must(t, err)
	defer func() {
		cancel()
		for range w.Responses() { // until the watch's goroutine is gone
		}
	}()

	a := agentRec("spiffe://example.org/meshid/agent/join/a", "a")
	b := agentRec("spiffe://example.org/meshid/agent/join/b", "b")
	audit := auditFor("agent.attest", a.ID)
	must(t, s.PutAgent(bg, a, &audit))
	must(t, s.PutAgent(bg, b, nil))
	got, err := s.GetAgent(bg, a.ID)
	must(t, err)
	if !reflect.DeepEqual(got, a) {
		t.Fatalf("GetAgent = %+v, want %+v", got, a)
	}
	list, err := s.ListAgents(bg)
	must(t, err)
	if !reflect.DeepEqual(list, []store.AgentRecord{a, b}) {
		t.Fatalf("ListAgents = %+v, want a then b", list)
	}
	if ev, err := s.ListAudit(bg, 1); err != nil || len(ev) != 1 || ev[0].Action != "agent.attest" {
		t.Fatalf("PutAgent's audit event: %+v, %v", ev, err)
	}

	// Failed calls change nothing.
	agentsUnchanged(t, s, "PutAgent without an id", store.ErrInvalid, func() error {
		return s.PutAgent(bg, store.AgentRecord{Node: "x"}, nil)
	})
	agentsUnchanged(t, s, "UpdateAgent of an unknown agent that refuses to create", store.ErrNotFound, func() error {
		_, err := s.UpdateAgent(bg, "spiffe://example.org/meshid/agent/join/none", func(r *store.AgentRecord, exists bool) error {
			r.Banned = true
			if !exists {
				return store.ErrNotFound
			}
			return nil
		}, nil)
		return err
	})
	errRefused := errors.New("refused")
	agentsUnchanged(t, s, "UpdateAgent whose fn fails after editing", errRefused, func() error {
		_, err := s.UpdateAgent(bg, a.ID, func(r *store.AgentRecord, _ bool) error {
			r.Banned, r.Node = true, "changed"
			return errRefused
		}, nil)
		return err
	})
	agentsUnchanged(t, s, "UpdateAgent changing the id", store.ErrInvalid, func() error {
		_, err := s.UpdateAgent(bg, a.ID, func(r *store.AgentRecord, _ bool) error { r.ID = "other"; return nil }, nil)
		return err
	})
	cancelled, stop := context.WithCancel(bg)
	stop()
	agentsUnchanged(t, s, "PutAgent with a cancelled context", context.Canceled, func() error {
		return s.PutAgent(cancelled, agentRec("spiffe://example.org/meshid/agent/join/z", "z"), nil)
	})
	agentsUnchanged(t, s, "UpdateAgent with a cancelled context", context.Canceled, func() error {
		_, err := s.UpdateAgent(cancelled, a.ID, func(r *store.AgentRecord, _ bool) error { r.Banned = true; return nil }, nil)
		return err
	})
	agentsUnchanged(t, s, "DeleteAgent with a cancelled context", context.Canceled, func() error {
		_, err := s.DeleteAgent(cancelled, a.ID, nop)
		return err
	})
	agentsUnchanged(t, s, "DeleteAgent unknown", store.ErrNotFound, func() error {
		_, err := s.DeleteAgent(bg, "spiffe://example.org/meshid/agent/join/none", nop)
		return err
	})

	// UpdateAgent edits what is stored, and creates when fn allows.
	banAt := t0.Add(time.Minute)
	upd, err := s.UpdateAgent(bg, a.ID, func(r *store.AgentRecord, exists bool) error {
		if !exists || r.Node != "a" {
			t.Errorf("UpdateAgent gave fn %+v exists=%v, want the stored record", *r, exists)
		}
		r.Banned, r.BannedAt = true, banAt
		r.NodeSVIDs = append(r.NodeSVIDs, store.AgentSVID{Serial: "0c", NotAfter: t0.Add(2 * time.Hour)})
		return nil
	}, &store.AuditEvent{Time: banAt, Actor: "storetest", Action: "agent.ban", Target: a.ID})
	must(t, err)
	if !upd.Banned || len(upd.NodeSVIDs) != 2 || !upd.SVIDExpiry().Equal(t0.Add(2*time.Hour)) {
		t.Fatalf("UpdateAgent returned %+v", upd)
	}
	if got, err := s.GetAgent(bg, a.ID); err != nil || !reflect.DeepEqual(got, upd) {
		t.Fatalf("GetAgent after UpdateAgent = %+v, %v; want %+v", got, err, upd)
	}
	cID := "spiffe://example.org/meshid/agent/join/c"
	created, err := s.UpdateAgent(bg, cID, func(r *store.AgentRecord, exists bool) error {
		if exists || r.ID != cID {
			t.Errorf("UpdateAgent of a new id gave fn %+v exists=%v", *r, exists)
		}
		r.Method, r.Node, r.FirstSeen = "join_token", "c", t0
		return nil
	}, nil)
	must(t, err)
	if created.Node != "c" {
		t.Fatalf("UpdateAgent created %+v", created)
	}

	old, err := s.DeleteAgent(bg, b.ID, auditFor("agent.evict", b.ID))
	must(t, err)
	if !reflect.DeepEqual(old, b) {
		t.Fatalf("DeleteAgent returned %+v, want %+v", old, b)
	}
	_, err = s.GetAgent(bg, b.ID)
	wantErr(t, "GetAgent after DeleteAgent", err, store.ErrNotFound)
	if list, err := s.ListAgents(bg); err != nil || len(list) != 2 || list[0].ID != a.ID || list[1].ID != cID {
		t.Fatalf("ListAgents after delete = %+v, %v", list, err)
	}

	// Every successful write is one watched commit, in order, carrying the
	// record; failed ones are not seen.
	want := []struct {
		op     store.Op
		key    string
		banned bool
	}{
		{store.OpPut, a.ID, false}, {store.OpPut, b.ID, false}, {store.OpPut, a.ID, true}, {store.OpPut, cID, false}, {store.OpDelete, b.ID, false},
	}
	prev := rev0
	for i, wc := range want {
		r := recv(t, w)
		if len(r.Events) != 1 || r.Revision <= prev {
			t.Fatalf("watch response %d: %+v (after revision %d), want one event", i, r, prev)
		}
		prev = r.Revision
		ev := r.Events[0]
		if ev.Kind != store.KindAgent || ev.Op != wc.op || ev.Key != wc.key || ev.Agent == nil || ev.Agent.ID != wc.key || ev.Agent.Banned != wc.banned {
			t.Fatalf("watch event %d: %+v (agent %+v), want %s %s banned=%v", i, ev, ev.Agent, wc.op, wc.key, wc.banned)
		}
	}
	if rev, err := s.Revision(bg); err != nil || rev != prev {
		t.Fatalf("Revision = %d, %v; want %d, the last agent commit's (the failed calls took none)", rev, err, prev)
	}
}
