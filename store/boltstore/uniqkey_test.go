package boltstore

import (
	"bytes"
	"encoding/hex"
	"testing"

	"github.com/meshid/meshid/store"
)

// Stores written before entries had parents hold each entry's uniqueness
// claim under the key of (SpiffeID, selectors). A parentless entry must keep
// that key, or an old store would let a duplicate in and DeleteEntry would
// leave the old claim behind. The constant is what the pre-parent uniqKey
// returned.
func TestUniqKeyParentlessUnchanged(t *testing.T) {
	e := store.Entry{SpiffeID: "spiffe://example.org/a", Selectors: []store.Selector{{Type: "unix", Value: "gid:2"}, {Type: "unix", Value: "uid:1"}}}
	const legacy = "6144237dd314cb4ba4343ff8585e98c91ce4828673a70f0d55f6251d0c9e04c4"
	if got := hex.EncodeToString(uniqKey(&e)); got != legacy {
		t.Fatalf("uniqKey of a parentless entry = %s, want the pre-parent key %s", got, legacy)
	}
	e.ParentID = "spiffe://example.org/meshid/agent/join/web-1"
	if bytes.Equal(uniqKey(&e), mustHex(t, legacy)) {
		t.Fatal("a parent does not change the uniqueness key")
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
