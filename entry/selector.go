package entry

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
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

// Kinds is the set of selector kinds the attestors in use can produce
// (attest.Set satisfies it). It is declared here, not imported, so that
// the server and the agent each pass the attestors they actually run.
type Kinds interface {
	// CheckSelector refuses a selector no attestor in the set produces,
	// saying which attestor would.
	CheckSelector(typ, value string) error
}

// Parse parses "type:key:value" (e.g. unix:uid:1000) into a Selector. It
// checks only the form; Validate checks size, characters and kind.
func Parse(s string) (Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok || typ == "" || value == "" {
		return Selector{}, fmt.Errorf("selector %q: want type:key:value, e.g. unix:uid:1000", s)
	}
	return Selector{Type: typ, Value: value}, nil
}

// String renders the selector as type:key:value, the form callers'
// selectors have and the Index is keyed by.
func (s Selector) String() string { return s.Type + ":" + s.Value }

// Validate checks a selector against the limits on its size and characters
// and against kinds: a kind no attestor in kinds produces (k8s:ns, say) is
// refused with the attestor that would.
func (s Selector) Validate(kinds Kinds) error {
	if n := len(s.Type) + 1 + len(s.Value); n > MaxSelectorLen {
		return fmt.Errorf("selector %.40q...: %d bytes, more than the %d allowed", s.Type+":"+s.Value, n, MaxSelectorLen)
	}
	if err := checkPrintable(s.Type + ":" + s.Value); err != nil {
		return fmt.Errorf("selector: %w", err)
	}
	if err := kinds.CheckSelector(s.Type, s.Value); err != nil {
		return fmt.Errorf("selector %s:%s: %w", s.Type, s.Value, err)
	}
	return nil
}

// Normalize returns the selectors sorted and de-duplicated, so that the
// same set always has the same form and duplicate entries are detected
// whatever the order the operator typed. sels is not modified.
func Normalize(sels []Selector) []Selector {
	out := slices.Clone(sels)
	slices.SortFunc(out, func(a, b Selector) int {
		if c := strings.Compare(a.Type, b.Type); c != 0 {
			return c
		}
		return strings.Compare(a.Value, b.Value)
	})
	return slices.Compact(out)
}

// Strings renders each selector as type:key:value.
func Strings(sels []Selector) []string {
	out := make([]string, len(sels))
	for i, s := range sels {
		out[i] = s.String()
	}
	return out
}

// PIDSelectors returns the selectors that pin one live local process: its
// pid and, as the pid-pinned rule of ValidateSelectors requires, the uid
// that owns it.
func PIDSelectors(pid int) ([]Selector, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+strconv.Itoa(pid), &st); err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	return []Selector{
		{Type: "unix", Value: "uid:" + strconv.FormatUint(uint64(st.Uid), 10)},
		{Type: "unix", Value: "pid:" + strconv.Itoa(pid)},
	}, nil
}

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
