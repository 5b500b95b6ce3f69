package controlplane

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/store"
)

// Limits on one registration entry. They keep any entry, and so any page of
// a listing, far below gRPC's 4 MiB message limit, and are documented in
// the README and `meshid entry create --help`.
const (
	// MaxSelectorsPerEntry bounds the selectors of one entry.
	MaxSelectorsPerEntry = 64
	// MaxSelectorLen bounds one selector, type:key:value, in bytes.
	MaxSelectorLen = 256
	// MaxDNSNamesPerEntry bounds the DNS SANs of one entry (and mint).
	MaxDNSNamesPerEntry = 32
	// MaxHintLen bounds an entry's Workload API hint, in bytes.
	MaxHintLen = 256
)

// checkPrintable refuses invalid UTF-8 and non-printable runes (control
// characters, line and paragraph separators, ...): selector values and
// hints are shown in terminals and logs, where such bytes can forge or
// hide output.
func checkPrintable(v string) error {
	if !utf8.ValidString(v) {
		return fmt.Errorf("%s is not valid UTF-8", strconv.Quote(v))
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("%s contains the non-printable character %U", strconv.QuoteToASCII(v), r)
		}
	}
	return nil
}

// attestors are the attestors this server runs on its workload socket;
// the selector kinds an entry may name are those they produce.
var attestors = attest.Builtin()

// ParseSelector parses "type:key:value" (e.g. unix:uid:1000) and checks that
// an attestor this server runs can produce it.
func ParseSelector(s string) (store.Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok || typ == "" || value == "" {
		return store.Selector{}, fmt.Errorf("selector %q: want type:key:value, e.g. unix:uid:1000", s)
	}
	sel := store.Selector{Type: typ, Value: value}
	return sel, ValidateSelector(sel)
}

// ValidateSelector checks a selector against the limits on its size and
// characters and the kinds the server's attestors produce: a kind none
// produces (k8s:ns, say) is refused with the attestor that would.
func ValidateSelector(sel store.Selector) error {
	if n := len(sel.Type) + 1 + len(sel.Value); n > MaxSelectorLen {
		return fmt.Errorf("selector %.40q...: %d bytes, more than the %d allowed", sel.Type+":"+sel.Value, n, MaxSelectorLen)
	}
	if err := checkPrintable(sel.Type + ":" + sel.Value); err != nil {
		return fmt.Errorf("selector: %w", err)
	}
	if err := attestors.CheckSelector(sel.Type, sel.Value); err != nil {
		return fmt.Errorf("selector %s:%s: %w", sel.Type, sel.Value, err)
	}
	return nil
}

// SelectorString renders a selector as type:key:value.
func SelectorString(s store.Selector) string { return s.Type + ":" + s.Value }

// normalizeSelectors sorts and de-duplicates, so that the same set always
// has the same form and duplicate entries are detected whatever the order
// the operator typed.
func normalizeSelectors(sels []store.Selector) []store.Selector {
	out := slices.Clone(sels)
	slices.SortFunc(out, func(a, b store.Selector) int {
		if c := strings.Compare(a.Type, b.Type); c != 0 {
			return c
		}
		return strings.Compare(a.Value, b.Value)
	})
	return slices.Compact(out)
}

// PIDSelectors returns the selectors that pin one live local process: its
// pid and, as checkPIDPinned requires, the uid that owns it.
func PIDSelectors(pid int) ([]store.Selector, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(pid), &st); err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	return []store.Selector{
		{Type: "unix", Value: "uid:" + strconv.FormatUint(uint64(st.Uid), 10)},
		{Type: "unix", Value: "pid:" + strconv.Itoa(pid)},
	}, nil
}
