package entry

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/meshid/meshid/ca"
)

// Validate applies the checks of a registration entry that need nothing
// but the entry, for creation and update alike: its selectors
// (ValidateSelectors), its TTL, DNS names and hint. It normalizes the
// selectors in place (Normalize). The SPIFFE ID is the caller's to check:
// which IDs an entry may grant depends on the server's trust domain.
//
// checkTTL, if not nil, is applied to a positive TTL: the longest a
// server can sign depends on its CA. The first failed check is returned.
func Validate(e *Entry, kinds Kinds, checkTTL func(time.Duration) error) error {
	if err := ValidateSelectors(e.Selectors, kinds); err != nil {
		return err
	}
	e.Selectors = Normalize(e.Selectors)
	if e.TTL < 0 {
		return fmt.Errorf("ttl %s must not be negative", e.TTL)
	}
	if e.TTL > 0 && checkTTL != nil {
		if err := checkTTL(e.TTL); err != nil {
			return err
		}
	}
	if err := ValidateDNSNames(e.DNSNames); err != nil {
		return err
	}
	return ValidateHint(e.Hint)
}

// ValidateSelectors checks an entry's selector set: at least one, at most
// MaxSelectorsPerEntry, each valid (Selector.Validate), and a unix:pid
// selector only with a unix:uid one beside it.
//
// The last rule is there because the server binds a connection to the
// process that opened it (start time and pidfd), but an entry names only a
// number: once the process exits, another user's process that is handed
// the same pid would match. Pinning the uid leaves that to processes of
// the same user, who hold its identity anyway.
func ValidateSelectors(sels []Selector, kinds Kinds) error {
	if len(sels) == 0 {
		return errors.New("at least one selector is required, e.g. --selector unix:uid:1000")
	}
	if len(sels) > MaxSelectorsPerEntry {
		return fmt.Errorf("%d selectors, more than the %d allowed per entry", len(sels), MaxSelectorsPerEntry)
	}
	for _, sel := range sels {
		if err := sel.Validate(kinds); err != nil {
			return err
		}
	}
	var pid, uid bool
	for _, sel := range sels {
		if sel.Type != "unix" {
			continue
		}
		pid = pid || strings.HasPrefix(sel.Value, "pid:")
		uid = uid || strings.HasPrefix(sel.Value, "uid:")
	}
	if pid && !uid {
		return errors.New("a unix:pid selector needs a unix:uid selector beside it: pids are reused, so another user's process could be given the same pid")
	}
	return nil
}

// ValidateDNSNames applies the CA's own rule (ca.CheckDNSName), so a name
// accepted here is one the CA will sign, and the per-entry count limit.
func ValidateDNSNames(names []string) error {
	if len(names) > MaxDNSNamesPerEntry {
		return fmt.Errorf("%d dns names, more than the %d allowed", len(names), MaxDNSNamesPerEntry)
	}
	for _, n := range names {
		if err := ca.CheckDNSName(n); err != nil {
			return err
		}
	}
	return nil
}

// ValidateHint checks a Workload API hint: at most MaxHintLen bytes of
// printable characters, as it is shown in terminals and logs.
func ValidateHint(hint string) error {
	if len(hint) > MaxHintLen {
		return fmt.Errorf("hint is %d bytes, more than the %d allowed", len(hint), MaxHintLen)
	}
	if err := checkPrintable(hint); err != nil {
		return fmt.Errorf("hint: %w", err)
	}
	return nil
}
