package store_test

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

func TestDiffSnapshots(t *testing.T) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 5, time.UTC)
	a := store.Snapshot{
		CAs:        []store.CARecord{{ID: "c1", Kind: "x509", CertDER: []byte("cert"), ChainDER: [][]byte{}, CreatedAt: at}},
		Tokens:     []store.JoinToken{{Hash: "secret-digest", SpiffeID: "spiffe://td/p", ExpiresAt: at}},
		CRLNumbers: map[string]int64{"c1": 3},
	}
	// The same state as another backend may represent it: nil for empty,
	// another location for the same instant, an empty map.
	b := store.Snapshot{
		CAs:        []store.CARecord{{ID: "c1", Kind: "x509", CertDER: []byte("cert"), CreatedAt: at.In(time.FixedZone("X", 3600))}},
		Entries:    []store.Entry{},
		Tokens:     []store.JoinToken{{Hash: "secret-digest", SpiffeID: "spiffe://td/p", ExpiresAt: at.In(time.Local)}},
		CRLNumbers: map[string]int64{"c1": 3},
	}
	if d := store.DiffSnapshots(a, b); d != nil {
		t.Fatalf("same state reported as different: %q", d)
	}

	b.CAs[0].SealedKey = []byte("k")
	b.CAs[0].State = store.CARevoked
	b.Tokens[0].BoundTo = "conn"
	b.Tokens[0].ExpiresAt = at.Add(time.Nanosecond)
	b.CRLNumbers = map[string]int64{"c1": 4, "c2": 1}
	b.Agents = []store.AgentRecord{{ID: "a"}}
	want := []string{
		"CA #0 (c1) differs in State, SealedKey",
		"join token #0 (spiffe://td/p) differs in ExpiresAt, BoundTo",
		"agent rows: 0, other side 1",
		"CRL number of c1: 3, other side 4",
		"CRL number of c2: missing, other side 1",
	}
	got := store.DiffSnapshots(a, b)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("diff =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, line := range got {
		if strings.Contains(line, "secret-digest") || strings.Contains(line, "107") {
			t.Fatalf("diff line shows a value: %q", line)
		}
	}
}

func TestTrustBundleAndCounts(t *testing.T) {
	snap := store.Snapshot{
		CAs: []store.CARecord{
			{ID: "a", Kind: "x509", State: store.CAActive, CertDER: []byte("a")},
			{ID: "b", Kind: "x509", State: store.CAPrepared, CertDER: []byte("b")},
			{ID: "c", Kind: "x509", State: store.CARevoked, CertDER: []byte("c")},
			{ID: "d", Kind: "x509", State: store.CATainted, CertDER: []byte("d")},
			{ID: "j", Kind: "jwt", State: store.CAActive, PublicKey: []byte("j")},
		},
		Entries: make([]store.Entry, 2),
	}
	if b := snap.TrustBundle(); len(b) != 4 || !strings.HasPrefix(b[0], "jwt:") || !strings.HasPrefix(b[3], "x509:") {
		t.Fatalf("bundle %q, want the 3 X.509 CAs not revoked and the JWT key, sorted", b)
	}
	c := snap.Counts()
	if c.CAs != 5 || c.Entries != 2 || c.Empty() || c.String() != "5 CA records, 2 entries" {
		t.Fatalf("counts %+v %q", c, c)
	}
	if s := (store.SnapshotCounts{}).String(); s != "nothing" {
		t.Fatalf("empty counts say %q", s)
	}
}
