package controlplane

import (
	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/store"
)

// Limits on one registration entry, as entry declares them; kept here for
// the package's tests.
const (
	MaxSelectorsPerEntry = entry.MaxSelectorsPerEntry
	MaxSelectorLen       = entry.MaxSelectorLen
	MaxDNSNamesPerEntry  = entry.MaxDNSNamesPerEntry
	MaxHintLen           = entry.MaxHintLen
)

// attestors are the attestors this server runs on its workload socket;
// the selector kinds an entry may name are those they produce.
var attestors = attest.Builtin()

// ParseSelector parses "type:key:value" (e.g. unix:uid:1000) and checks that
// an attestor this server runs can produce it.
func ParseSelector(s string) (store.Selector, error) {
	sel, err := entry.Parse(s)
	if err != nil {
		return store.Selector{}, err
	}
	return sel, sel.Validate(attestors)
}

// SelectorString renders a selector as type:key:value.
func SelectorString(s store.Selector) string { return s.String() }

// PIDSelectors returns the selectors that pin one live local process; see
// entry.PIDSelectors.
func PIDSelectors(pid int) ([]store.Selector, error) { return entry.PIDSelectors(pid) }
