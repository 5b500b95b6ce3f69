package boltstore

import (
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
)

// TestEntryCodecRoundTrip: every entry layout reads back as written; an
// entry without hint and parent keeps the oldest layout (older versions
// read it), and the parent survives with or without a hint.
func TestEntryCodecRoundTrip(t *testing.T) {
	base := store.Entry{ID: "e1", SpiffeID: "spiffe://td/w", Selectors: []store.Selector{{Type: "unix", Value: "uid:1"}},
		TTL: time.Hour, DNSNames: []string{"a.example"}, CreatedAt: time.Unix(1700000000, 5).UTC()}
	for _, tc := range []struct {
		name       string
		hint, par  string
		wantLayout byte
	}{
		{"plain", "", "", entryV1},
		{"hint", "web", "", entryV2},
		{"parent", "", "spiffe://td/meshid/agent/join/n1", entryV3},
		{"hint and parent", "web", "spiffe://td/meshid/agent/join/n1", entryV3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := base
			e.Hint, e.ParentID = tc.hint, tc.par
			b := encodeEntry(&e)
			if b[0] != tc.wantLayout {
				t.Fatalf("layout %d, want %d", b[0], tc.wantLayout)
			}
			got, err := decodeEntry(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, e) {
				t.Fatalf("read back %+v, want %+v", got, e)
			}
		})
	}
}
