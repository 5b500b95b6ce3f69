package storetest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// RunMigrator checks a backend's store.Migrator: a store filled through the
// normal API (every kind, several rows each, used and bound tokens, a
// banned agent, CRL counters) exports, imports into a new store and exports
// again to exactly the same snapshot; the imported store behaves like the
// original (a used token stays bound, CRL numbers continue, the entry
// uniqueness rule holds, audit and watch carry on); and Import into a store
// holding anything at all, one kind at a time, fails with
// store.ErrAlreadyExists and changes nothing. open returns a new, empty
// store whose Close the suite may call (also twice).
func RunMigrator(t *testing.T, open func(t *testing.T) store.Store) {
	newStore := func(t *testing.T) (store.Store, store.Migrator) {
		t.Helper()
		s := open(t)
		t.Cleanup(func() { _ = s.Close() })
		m, ok := s.(store.Migrator)
		if !ok {
			t.Fatalf("%T does not implement store.Migrator", s)
		}
		return s, m
	}
	t.Run("Empty", func(t *testing.T) {
		_, m := newStore(t)
		snap, err := m.Export(bg)
		must(t, err)
		if c := snap.Counts(); !c.Empty() {
			t.Fatalf("Export of an empty store holds %s", c)
		}
		_, dst := newStore(t)
		must(t, dst.Import(bg, snap))
		again, err := dst.Export(bg)
		must(t, err)
		if c := again.Counts(); !c.Empty() {
			t.Fatalf("after importing an empty snapshot the store holds %s", c)
		}
	})
	t.Run("RoundTrip", func(t *testing.T) {
		src, srcM := newStore(t)
		want := FillForMigration(t, src)
		snap, err := srcM.Export(bg)
		must(t, err)
		if got := snap.Counts(); got != want {
			t.Fatalf("Export counts %+v, want %+v (what the fill wrote)", got, want)
		}
		checkExportMatchesReads(t, src, snap)

		dst, dstM := newStore(t)
		rev0, err := dst.Revision(bg)
		must(t, err)
		must(t, dstM.Import(bg, snap))
		again, err := dstM.Export(bg)
		must(t, err)
		if d := store.DiffSnapshots(snap, again); len(d) > 0 {
			t.Fatalf("export after import differs from the imported snapshot:\n%s", strings.Join(d, "\n"))
		}
		checkExportMatchesReads(t, dst, snap)
		checkImportedBehaves(t, dst, snap, rev0)
	})
	t.Run("NonEmptyTarget", func(t *testing.T) {
		src, srcM := newStore(t)
		FillForMigration(t, src)
		snap, err := srcM.Export(bg)
		must(t, err)
		// One store per kind, holding that kind alone where the API allows
		// it (some writes always come with their audit event).
		holding := map[string]func(store.Store) error{
			"a CA record": func(s store.Store) error {
				return s.PutCA(bg, store.CARecord{ID: "other-ca", Kind: "x509", State: store.CAActive, CertDER: []byte{1}}, nil)
			},
			"an entry": func(s store.Store) error {
				return s.CreateEntry(bg, entry("other-entry", "spiffe://example.org/other"), nop)
			},
			"an inventory row": func(s store.Store) error { return s.RecordSVID(bg, svid(999, t0.Add(time.Hour))) },
			"an audit event":   func(s store.Store) error { return s.AppendAudit(bg, nop) },
			"a join token": func(s store.Store) error {
				return s.CreateToken(bg, token("other-token", "spiffe://example.org/other", false), nop)
			},
			"a revoked serial": func(s store.Store) error {
				return s.RevokeSerials(bg, []store.RevokedSerial{revoked("0f0f", t0.Add(time.Hour))}, nop)
			},
			"an agent record": func(s store.Store) error {
				return s.PutAgent(bg, agentRec("spiffe://example.org/meshid/agent/join/other", "other"), nil)
			},
			"a CRL counter": func(s store.Store) error { _, err := s.NextCRLNumber(bg, "other-ca", 5); return err },
		}
		for what, write := range holding {
			t.Run(strings.ReplaceAll(what, " ", "_"), func(t *testing.T) {
				dst, dstM := newStore(t)
				must(t, write(dst))
				before, err := dstM.Export(bg)
				must(t, err)
				if before.Counts().Empty() {
					t.Fatalf("the store holding %s exports nothing", what)
				}
				wantErr(t, "Import into a store holding "+what, dstM.Import(bg, snap), store.ErrAlreadyExists)
				after, err := dstM.Export(bg)
				must(t, err)
				if d := store.DiffSnapshots(before, after); len(d) > 0 {
					t.Fatalf("refused Import changed the store:\n%s", strings.Join(d, "\n"))
				}
			})
		}
	})
}

// Names FillForMigration uses, for the checks on the imported store.
const (
	migUsedToken   = "usedtoken"
	migUnusedToken = "unusedtoken"
	migReusable    = "reusabletoken"
	migAttestToken = "attesttoken"
	migConn        = "conn-1"
	migBanned      = "spiffe://example.org/meshid/agent/join/banned"
	migAttested    = "spiffe://example.org/meshid/agent/join/attested"
	migCA          = "ca-x509-active"
)

// FillForMigration writes rows of every kind through the normal API into
// the empty store s and returns the counts Export must then find. Tests
// of the migration tool use it for a realistic source.
func FillForMigration(t *testing.T, s store.Store) store.SnapshotCounts {
	t.Helper()
	var want store.SnapshotCounts
	audits := 0
	// Times with nanoseconds and not in UTC: a backend must keep the
	// instant.
	at := func(d time.Duration) time.Time {
		return t0.Add(d + 123456789).In(time.FixedZone("X", 3*3600))
	}
	cas := []store.CARecord{
		{ID: "ca-x509-old", Kind: "x509", State: store.CARetired, CertDER: []byte("old-cert"), SealedKey: []byte("sealed-old"),
			NotBefore: at(-48 * time.Hour), NotAfter: at(48 * time.Hour), CreatedAt: at(-48 * time.Hour)},
		{ID: migCA, Kind: "x509", State: store.CAActive, CertDER: []byte("active-cert"),
			ChainDER: [][]byte{[]byte("intermediate-1"), []byte("intermediate-2")}, SealedKey: []byte("sealed-active"),
			NotBefore: at(-time.Hour), NotAfter: at(72 * time.Hour), CreatedAt: at(-time.Hour)},
		{ID: "ca-x509-next", Kind: "x509", State: store.CAPrepared, CertDER: []byte("next-cert"), SealedKey: []byte("sealed-next"),
			NotBefore: at(0), NotAfter: at(96 * time.Hour), CreatedAt: at(-time.Hour)}, // same CreatedAt: ties by ID
		{ID: "ca-x509-revoked", Kind: "x509", State: store.CARevoked, CertDER: []byte("revoked-cert"),
			NotBefore: at(-72 * time.Hour), NotAfter: at(24 * time.Hour), CreatedAt: at(-72 * time.Hour)},
		{ID: "jwt-key-1", Kind: "jwt", State: store.CAActive, PublicKey: []byte("pkix"), SealedKey: []byte("sealed-jwt"),
			NotBefore: at(0), NotAfter: at(24 * time.Hour), CreatedAt: at(time.Minute)},
	}
	for i, c := range cas {
		var ev *store.AuditEvent
		if i%2 == 0 {
			ev = &store.AuditEvent{Time: at(time.Duration(i) * time.Second), Actor: "ca", Action: "ca.put", Target: c.ID}
			audits++
		}
		must(t, s.PutCA(bg, c, ev))
	}
	want.CAs = len(cas)

	entries := []store.Entry{
		entry("e-1", "spiffe://example.org/web", "unix:uid:1000"),
		entry("e-2", "spiffe://example.org/web", "unix:uid:1001", "unix:gid:50"),
		entry("e-3", "spiffe://example.org/db", "k8s:ns:db"),
		entry("e-4", "spiffe://example.org/db", "k8s:ns:db"), // same ID and selectors, another parent
		entry("e-5", "spiffe://example.org/gone", "unix:uid:7"),
	}
	entries[1].DNSNames = []string{"web.example.org", "web"}
	entries[1].Hint = "web-hint"
	entries[1].TTL = 90 * time.Minute
	entries[2].CreatedAt = at(time.Hour)
	entries[3].ParentID = migAttested
	entries[3].Hint = "db-on-node"
	for _, e := range entries {
		must(t, s.CreateEntry(bg, e, auditFor("entry.create", e.ID)))
		audits++
	}
	_, err := s.DeleteEntry(bg, "e-5", auditFor("entry.delete", "e-5"))
	must(t, err)
	audits++
	want.Entries = len(entries) - 1

	for i := range 12 {
		r := svid(i, at(time.Duration(i%5)*time.Hour))
		if i%3 == 0 {
			r.EntryID = ""
			r.Requester = "admin uid:0"
		}
		must(t, s.RecordSVID(bg, r))
	}
	want.SVIDs = 12

	for i := range 3 {
		ev := store.AuditEvent{Time: at(time.Duration(i) * time.Millisecond), Actor: "admin uid:0", Action: "x509.mint",
			Target: fmt.Sprintf("spiffe://example.org/m%d", i), Detail: "ttl=1h"}
		must(t, s.AppendAudit(bg, ev))
		audits++
	}

	toks := []store.JoinToken{
		token(migUsedToken, "spiffe://example.org/proxy", true),
		token(migUnusedToken, "spiffe://example.org/proxy", true),
		token(migReusable, "spiffe://example.org/other", false),
		token(migAttestToken, migAttested, true),
	}
	for _, tk := range toks {
		must(t, s.CreateToken(bg, tk, auditFor("token.create", tk.SpiffeID)))
		audits++
	}
	if _, err := s.UseToken(bg, migUsedToken, t0.Add(time.Minute), migConn); err != nil {
		t.Fatal(err)
	}
	want.Tokens = len(toks)

	must(t, s.RevokeSerials(bg, []store.RevokedSerial{revoked("00aa", t0.Add(time.Hour)), revoked("00bb", t0.Add(2*time.Hour))}, auditFor("revoke", "a")))
	must(t, s.RevokeSerials(bg, []store.RevokedSerial{revoked("00cc", t0.Add(3*time.Hour))}, auditFor("revoke", "b")))
	audits += 2
	want.Revoked = 3

	must(t, s.PutAgent(bg, agentRec("spiffe://example.org/meshid/agent/join/plain", "plain"), nil))
	must(t, s.PutAgent(bg, agentRec(migBanned, "banned"), nil))
	ban := auditFor("agent.ban", migBanned)
	if _, err := s.UpdateAgent(bg, migBanned, func(r *store.AgentRecord, exists bool) error {
		if !exists {
			return store.ErrNotFound
		}
		r.Banned, r.BannedAt = true, at(2*time.Minute)
		return nil
	}, &ban); err != nil {
		t.Fatal(err)
	}
	audits++
	attest := auditFor("agent.attest", migAttested)
	if _, _, err := s.AttestAgent(bg, migAttestToken, t0.Add(time.Minute), "agent-conn", migAttested,
		func(_ store.JoinToken, r *store.AgentRecord, _ bool) error {
			r.Method, r.Node, r.FirstSeen, r.LastSeen = "join_token", "attested", at(time.Minute), at(time.Minute)
			r.NodeSVIDs = []store.AgentSVID{{Serial: "0c01", NotAfter: at(time.Hour)}, {Serial: "0c02", NotAfter: at(2 * time.Hour)}}
			return nil
		}, &attest); err != nil {
		t.Fatal(err)
	}
	audits++
	want.Agents = 3

	for _, c := range []struct {
		id    string
		floor int64
	}{{migCA, 1}, {migCA, 1}, {migCA, 1}, {"jwt-key-1", 1_700_000_000_000}} {
		_, err := s.NextCRLNumber(bg, c.id, c.floor)
		must(t, err)
	}
	want.CRLNumbers = 2
	want.Audit = audits
	return want
}

// checkExportMatchesReads checks that snap holds what s's read methods
// return, in their order.
func checkExportMatchesReads(t *testing.T, s store.Store, snap store.Snapshot) {
	t.Helper()
	var read store.Snapshot
	var err error
	read.CAs, err = s.ListCAs(bg)
	must(t, err)
	read.Entries, _, err = s.ListEntries(bg, store.EntryQuery{})
	must(t, err)
	read.SVIDs, _, err = s.ListSVIDs(bg, store.SVIDQuery{})
	must(t, err)
	read.Audit, err = s.ListAudit(bg, 0)
	must(t, err)
	slices.Reverse(read.Audit) // ListAudit is newest first
	read.Revoked, err = s.ListRevoked(bg)
	must(t, err)
	read.Agents, err = s.ListAgents(bg)
	must(t, err)
	// Tokens and CRL counters have no listing: they are checked by use.
	read.Tokens, read.CRLNumbers = snap.Tokens, snap.CRLNumbers
	if d := store.DiffSnapshots(read, snap); len(d) > 0 {
		t.Fatalf("Export differs from what the read methods return:\n%s", strings.Join(d, "\n"))
	}
	var used store.JoinToken
	for _, tk := range snap.Tokens {
		if tk.Hash == migUsedToken {
			used = tk
		}
	}
	if used.UsedAt.IsZero() || used.BoundTo != migConn {
		t.Fatalf("exported used token = %+v, want UsedAt set and BoundTo %q", used, migConn)
	}
	if n := snap.CRLNumbers[migCA]; n != 3 {
		t.Fatalf("exported CRL number of %s = %d, want 3", migCA, n)
	}
}

// checkImportedBehaves uses the imported store as a server would.
func checkImportedBehaves(t *testing.T, s store.Store, snap store.Snapshot, rev0 int64) {
	t.Helper()
	now := t0.Add(2 * time.Minute)
	if _, err := s.UseToken(bg, migUsedToken, now, migConn); err != nil {
		t.Fatalf("the used token on the connection it is bound to: %v", err)
	}
	_, err := s.UseToken(bg, migUsedToken, now, "another-conn")
	wantErr(t, "the used token on another connection", err, store.ErrNotFound)
	_, err = s.UseToken(bg, migAttestToken, now, "another-conn")
	wantErr(t, "the token an agent attested with, on another connection", err, store.ErrNotFound)
	tokenUnspent(t, s, "the unused single-use token", migUnusedToken, now)
	if tk, err := s.UseToken(bg, migUnusedToken, now, "conn-2"); err != nil || tk.BoundTo != "conn-2" {
		t.Fatalf("first use of the unused token after import = %+v, %v", tk, err)
	}

	if n, err := s.NextCRLNumber(bg, migCA, 1); err != nil || n != snap.CRLNumbers[migCA]+1 {
		t.Fatalf("NextCRLNumber after import = %d, %v; want %d", n, err, snap.CRLNumbers[migCA]+1)
	}
	// Import rebuilds each CA's latest NotAfter from the rows.
	lastWant := map[string]time.Time{}
	var lastIDs []string
	for _, r := range snap.SVIDs {
		ceil := r.NotAfter.Truncate(time.Second)
		if ceil.Before(r.NotAfter) {
			ceil = ceil.Add(time.Second)
		}
		if w, ok := lastWant[r.CAID]; !ok {
			lastIDs = append(lastIDs, r.CAID)
			lastWant[r.CAID] = ceil
		} else if ceil.After(w) {
			lastWant[r.CAID] = ceil
		}
	}
	if len(lastWant) == 0 {
		t.Fatal("the migration fill has no inventory rows")
	}
	wantLast(t, s, "after import", lastIDs, lastWant)
	dupe := entry("e-dupe", "spiffe://example.org/web", "unix:uid:1000") // e-1's ID and selectors
	wantErr(t, "CreateEntry duplicating an imported entry", s.CreateEntry(bg, dupe, nop), store.ErrAlreadyExists)
	wantErr(t, "CreateEntry with an imported entry's ID", s.CreateEntry(bg, entry("e-1", "spiffe://example.org/new"), nop), store.ErrAlreadyExists)
	if a, err := s.GetAgent(bg, migBanned); err != nil || !a.Banned || a.BannedAt.IsZero() {
		t.Fatalf("banned agent after import = %+v, %v", a, err)
	}

	// The audit trail carries on after the imported events.
	must(t, s.AppendAudit(bg, auditFor("after.import", "x")))
	evs, err := s.ListAudit(bg, 0)
	must(t, err)
	if len(evs) != len(snap.Audit)+1 || evs[0].Action != "after.import" {
		t.Fatalf("audit after import: %d events, newest %+v; want %d, newest after.import", len(evs), evs[0], len(snap.Audit)+1)
	}

	// A watch from the revision after the import sees the next write.
	rev, err := s.Revision(bg)
	must(t, err)
	if rev < rev0 {
		t.Fatalf("revision went from %d to %d over the import", rev0, rev)
	}
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	w, err := s.Watch(ctx, rev)
	must(t, err)
	defer func() {
		cancel()
		for range w.Responses() {
		}
	}()
	must(t, s.CreateEntry(bg, entry("after-import", "spiffe://example.org/after"), nop))
	r := recv(t, w)
	if r.Revision <= rev || len(r.Events) != 1 || r.Events[0].Key != "after-import" {
		t.Fatalf("watch from %d after import got %+v, want the new entry at a higher revision", rev, r)
	}
}
