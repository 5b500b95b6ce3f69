package controlplane

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

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

// selectorKinds lists the selector keys each attestor can produce. An entry
// naming anything else could never match, so it is refused at creation
// rather than silently never served.
var selectorKinds = map[string]map[string]func(string) error{
	"unix": {
		"uid":    numeric,
		"gid":    numeric,
		"pid":    numeric,
		"path":   absPath,
		"sha256": sha256Hex,
	},
	"k8s": {
		"ns":        nonEmpty,
		"sa":        nonEmpty,
		"pod-name":  nonEmpty,
		"pod-uid":   nonEmpty,
		"node-name": nonEmpty,
		"pod-label": labelValue,
	},
	// A join token's SPIFFE ID is carried by the token itself; entries may
	// still key on it to grant further identities.
	"token": {
		"id": nonEmpty,
	},
}

func numeric(v string) error {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || strconv.FormatUint(n, 10) != v {
		return fmt.Errorf("%q is not a decimal number", v)
	}
	return nil
}

// absPath checks a unix:path value: the caller's executable is always
// known by its absolute, clean path (readlink of /proc/<pid>/exe).
func absPath(v string) error {
	if !filepath.IsAbs(v) || filepath.Clean(v) != v {
		return fmt.Errorf("%q is not an absolute, clean path (e.g. /usr/bin/envoy)", v)
	}
	return nil
}

// sha256Hex checks a unix:sha256 value: the executable's SHA-256 as 64
// lowercase hex digits, the form sha256sum prints.
func sha256Hex(v string) error {
	if len(v) != 64 || strings.Trim(v, "0123456789abcdef") != "" {
		return fmt.Errorf("%q is not a SHA-256 in 64 lowercase hex digits (as sha256sum prints)", v)
	}
	return nil
}

func nonEmpty(v string) error {
	if v == "" {
		return fmt.Errorf("empty value")
	}
	return nil
}

func labelValue(v string) error {
	k, _, ok := strings.Cut(v, ":")
	if !ok || k == "" {
		return fmt.Errorf("%q is not of the form key:value", v)
	}
	return nil
}

// ParseSelector parses "type:key:value" (e.g. unix:uid:1000) and checks that
// an attestor can produce it.
func ParseSelector(s string) (store.Selector, error) {
	typ, value, ok := strings.Cut(s, ":")
	if !ok || typ == "" || value == "" {
		return store.Selector{}, fmt.Errorf("selector %q: want type:key:value, e.g. unix:uid:1000", s)
	}
	sel := store.Selector{Type: typ, Value: value}
	return sel, ValidateSelector(sel)
}

// ValidateSelector checks a selector against the known selector kinds and
// the limits on its size and characters.
func ValidateSelector(sel store.Selector) error {
	if n := len(sel.Type) + 1 + len(sel.Value); n > MaxSelectorLen {
		return fmt.Errorf("selector %.40q...: %d bytes, more than the %d allowed", sel.Type+":"+sel.Value, n, MaxSelectorLen)
	}
	if err := checkPrintable(sel.Type + ":" + sel.Value); err != nil {
		return fmt.Errorf("selector: %w", err)
	}
	keys, ok := selectorKinds[sel.Type]
	if !ok {
		return fmt.Errorf("selector %s:%s: unknown selector type %q (known: unix, k8s, token)", sel.Type, sel.Value, sel.Type)
	}
	key, value, ok := strings.Cut(sel.Value, ":")
	check, known := keys[key]
	if !ok || !known {
		names := make([]string, 0, len(keys))
		for k := range keys {
			names = append(names, k)
		}
		slices.Sort(names)
		return fmt.Errorf("selector %s:%s: unknown %s selector key %q (known: %s)", sel.Type, sel.Value, sel.Type, key, strings.Join(names, ", "))
	}
	if err := check(value); err != nil {
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
