package etcdstore

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/store"
)

// TestQuorumLoss stops two members of three: writes fail with
// ErrUnavailable within about RequestTimeout and change nothing, Health
// says so; after the members restart the same Store writes again, Health
// recovers and its watch delivers the new change.
func TestQuorumLoss(t *testing.T) {
	c := etcdtest.Start(t, 3)
	s, err := Open(bg, Options{Endpoints: c.Endpoints(), Prefix: "/q/", RequestTimeout: time.Second, HealthInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateEntry(bg, testEntry("before", "spiffe://example.org/before"), nop); err != nil {
		t.Fatal(err)
	}
	if err := s.Announce(bg, store.Replica{Version: "test", StartedAt: t0, Addresses: []string{"127.0.0.1:8443"}}); err != nil {
		t.Fatal(err)
	}
	l, err := s.Campaign(bg)
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Cluster(bg)
	if err != nil {
		t.Fatal(err)
	}
	leaders := 0
	for _, m := range st.Members {
		if !m.Healthy || m.Revision == 0 || m.DBSize == 0 || m.Endpoint == "" {
			t.Fatalf("member %+v", m)
		}
		if m.Leader {
			leaders++
		}
	}
	if st.Backend != "etcd" || len(st.Members) != 3 || leaders != 1 || st.Leader != s.opts.Replica || st.Revision == 0 ||
		len(st.Replicas) != 1 || st.Replicas[0].ID != s.opts.Replica || st.Replicas[0].Version != "test" {
		t.Fatalf("Cluster = %+v", st)
	}
	if err := l.Resign(bg); err != nil {
		t.Fatal(err)
	}
	rev, _ := s.Revision(bg)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	w, err := s.Watch(ctx, rev)
	if err != nil {
		t.Fatal(err)
	}
	// A follower stops gracefully, the Raft leader dies.
	leader := -1
	for _, m := range st.Members {
		if m.Leader {
			leader = slices.Index(c.Endpoints(), m.Endpoint)
		}
	}
	if leader < 0 {
		t.Fatalf("no Raft leader among %v", c.Endpoints())
	}
	follower := (leader + 1) % 3
	c.Stop(t, follower)
	c.Kill(t, leader)
	start := time.Now()
	err = s.CreateEntry(bg, testEntry("lost", "spiffe://example.org/lost"), nop)
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("CreateEntry without quorum: %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("CreateEntry took %v to fail (RequestTimeout 1s)", d)
	}
	t.Logf("CreateEntry without quorum: %v (after %v)", err, time.Since(start))
	if err := s.RecordSVID(bg, testSVID(1)); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("RecordSVID without quorum: %v, want ErrUnavailable", err)
	}
	waitFor(t, func() bool { return errors.Is(s.Health(), store.ErrUnavailable) })
	// Reads keep working (serializable, from the member left).
	if es, _, err := s.ListEntries(bg, store.EntryQuery{}); err != nil || len(es) != 1 || es[0].ID != "before" {
		t.Fatalf("ListEntries without quorum: %+v, %v", es, err)
	}
	c.Restart(t, follower)
	c.Restart(t, leader)
	waitFor(t, func() bool { return s.Health() == nil })
	var after error
	waitFor(t, func() bool {
		after = s.CreateEntry(bg, testEntry("after", "spiffe://example.org/after"), nop)
		return after == nil || errors.Is(after, store.ErrAlreadyExists)
	})
	es, _, err := s.ListEntries(bg, store.EntryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 || es[0].ID != "after" || es[1].ID != "before" {
		t.Fatalf("entries after quorum returned: %+v (the refused write must not be there)", es)
	}
	if rows, _, _ := s.ListSVIDs(bg, store.SVIDQuery{}); len(rows) != 0 {
		t.Fatalf("refused RecordSVID left %d rows", len(rows))
	}
	select {
	case r := <-w.Responses():
		if len(r.Events) != 1 || r.Events[0].Key != "after" {
			t.Fatalf("watch after quorum returned: %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("watch silent after quorum returned (err %v)", w.Err())
	}
}

// TestTLS runs the store over https with a client certificate, and checks
// that the same endpoints refuse a client without one.
func TestTLS(t *testing.T) {
	c := etcdtest.Start(t, 1, etcdtest.Options{TLS: true, UnsafeNoFsync: true})
	s, err := Open(bg, Options{Endpoints: c.Endpoints(), TLS: c.ClientTLS(), DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateEntry(bg, testEntry("e", "spiffe://example.org/e"), nop); err != nil {
		t.Fatal(err)
	}
	if e, err := s.GetEntry(bg, "e"); err != nil || e.SpiffeID != "spiffe://example.org/e" {
		t.Fatalf("GetEntry over TLS: %+v, %v", e, err)
	}
	noCert := c.ClientTLS()
	noCert.Certificates = nil
	if s2, err := Open(bg, Options{Endpoints: c.Endpoints(), TLS: noCert, DialTimeout: time.Second}); !errors.Is(err, store.ErrUnavailable) {
		if s2 != nil {
			s2.Close()
		}
		t.Fatalf("Open without a client certificate: %v, want ErrUnavailable", err)
	}
}
