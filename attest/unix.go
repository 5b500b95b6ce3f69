package attest

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// Unix is the unix attestor: a workload-socket caller's uid and gid from
// the kernel (SO_PEERCRED), and for a process tracked since accept (see
// UnixCredentials) its pid, executable path and executable SHA-256.
type Unix struct{}

// Name implements Attestor.
func (Unix) Name() string { return "unix" }

// unixKinds are the kinds Unix.Attest produces, with the values it
// produces: anything else could never match.
var unixKinds = []Kind{
	{Type: "unix", Key: "uid", Value: "N", Check: decimal},
	{Type: "unix", Key: "gid", Value: "N", Check: decimal},
	{Type: "unix", Key: "pid", Value: "N", Check: decimal},
	{Type: "unix", Key: "path", Value: "/ABS/PATH", Check: absPath},
	{Type: "unix", Key: "sha256", Value: "HEX", Check: sha256Hex},
}

// Kinds implements Attestor.
func (Unix) Kinds() []Kind { return unixKinds }

// Attest implements Attestor: unix:uid and unix:gid always, and for a
// tracked process unix:pid, unix:path and unix:sha256, those that can be
// read (a process of another user is unreadable to a server that is not
// root; a deleted executable has no path; one over MaxExeHashSize gets no
// digest). What is read by pid is not checked here; see Set.Caller.
func (Unix) Attest(_ context.Context, p PeerCred) ([]string, error) {
	out := p.Selectors()
	if p.proc != nil {
		out = append(out, p.proc.exeSelectors()...)
	}
	return out, nil
}

// decimal checks a uid, gid or pid: the kernel's number in the form
// strconv prints it, so "007" or "+7", which no caller has, are refused.
func decimal(v string) error {
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
