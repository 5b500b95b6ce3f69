// Package endpoint holds what every meshid unix or TCP endpoint needs
// before a request is read: listening on a unix socket safely (directory
// checks, the socket's mode fixed before it is reachable) and bounding the
// connections a listener holds.
package endpoint

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ListenUnix listens on a unix socket at path whose mode is perm from the
// moment it is reachable there.
//
// Every directory on the way that already exists must be trustworthy:
// owned by root or by this process's effective uid and not writable by
// group or others (a sticky directory such as /tmp excepted, since there
// nobody can rename or remove another user's entries). Otherwise an
// error names the directory, because a user who controls it could swap
// the socket for their own listener. Missing directories are created:
// the socket's own directory with dirPerm, those above it with 0755 so
// that a private directory never hides a public sibling.
//
// The socket is bound inside a fresh 0700 directory only this process can
// write, its mode set there, and renamed into place: nothing is ever
// chmodded by a path another user could redirect with a symlink. A live
// socket at path (another server) is an error; a dead one is replaced; any
// other file at path is an error. A relative path is made absolute.
func ListenUnix(path string, perm, dirPerm os.FileMode) (*net.UnixListener, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	dir := filepath.Dir(abs)
	if err := ensureDir(dir, dirPerm); err != nil {
		return nil, err
	}
	if err := removeStale(abs); err != nil {
		return nil, err
	}
	// A short name: a unix socket path has at most 107 bytes.
	priv, err := os.MkdirTemp(dir, ".s")
	if err != nil {
		return nil, fmt.Errorf("socket %s: private directory: %w", abs, err)
	}
	defer os.Remove(priv)
	tmp := filepath.Join(priv, "s")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", abs, err)
	}
	// After the rename tmp no longer exists; the caller removes path.
	lis.SetUnlinkOnClose(false)
	fail := func(err error) (*net.UnixListener, error) {
		lis.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("socket %s: %w", abs, err)
	}
	if err := chmodIn(priv, "s", perm); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, abs); err != nil {
		return fail(err)
	}
	return lis, nil
}

// chmodIn sets the mode of name inside dir, resolved from a descriptor of
// dir opened without following symlinks, so the name cannot be redirected.
func chmodIn(dir, name string, perm os.FileMode) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchmodat(fd, name, uint32(perm.Perm()), 0); err != nil {
		return fmt.Errorf("chmod socket: %w", err)
	}
	return nil
}

// removeStale clears path for a new socket: a dead socket is removed, a
// live one (another server) or anything that is not a socket is an error.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s); remove it or choose another path", path, fi.Mode().Type())
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%s is in use by another running server", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// ensureDir checks every existing directory from / down to dir and creates
// the missing ones.
func ensureDir(dir string, dirPerm os.FileMode) error {
	parts := prefixes(dir)
	for i, p := range parts {
		fi, err := os.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			for j := i; j < len(parts); j++ {
				perm := os.FileMode(0o755)
				if j == len(parts)-1 {
					perm = dirPerm
				}
				if err := mkdirOwn(parts[j], perm); err != nil {
					return err
				}
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("socket directory %s: %w", p, err)
		}
		if err := checkExisting(p, fi); err != nil {
			return err
		}
	}
	return nil
}

// checkExisting checks one existing path component; a symlink's owner must
// be trusted, and so must every directory of its target.
func checkExisting(p string, fi fs.FileInfo) error {
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		if err := trustedOwner(p, fi); err != nil {
			return err
		}
		target, err := filepath.EvalSymlinks(p)
		if err != nil {
			return fmt.Errorf("socket directory %s: %w", p, err)
		}
		for _, q := range prefixes(target) {
			qi, err := os.Lstat(q)
			if err != nil {
				return fmt.Errorf("socket directory %s (via %s): %w", q, p, err)
			}
			if err := checkDir(q, qi); err != nil {
				return err
			}
		}
		return nil
	default:
		return checkDir(p, fi)
	}
}

func checkDir(p string, fi fs.FileInfo) error {
	if !fi.IsDir() {
		return fmt.Errorf("socket directory %s is not a directory", p)
	}
	if err := trustedOwner(p, fi); err != nil {
		return err
	}
	m := fi.Mode()
	if m.Perm()&0o022 != 0 && m&fs.ModeSticky == 0 {
		return fmt.Errorf("socket directory %s is writable by group or others (mode %04o): another user could replace the socket; make it 0755 or 0700, or choose another path", p, m.Perm())
	}
	return nil
}

func trustedOwner(p string, fi fs.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("socket directory %s: no owner information", p)
	}
	if euid := os.Geteuid(); st.Uid != 0 && int(st.Uid) != euid {
		return fmt.Errorf("socket directory %s is owned by uid %d, not by root or this server (uid %d): that user could replace the socket; remove it or choose another path", p, st.Uid, euid)
	}
	return nil
}

// mkdirOwn creates dir with exactly perm. The umask is undone through a
// descriptor of the new directory, not its path; a directory someone else
// made there first is checked like any existing one.
func mkdirOwn(dir string, perm os.FileMode) error {
	if err := unix.Mkdir(dir, uint32(perm.Perm())); err != nil {
		if errors.Is(err, unix.EEXIST) {
			fi, err := os.Lstat(dir)
			if err != nil {
				return fmt.Errorf("socket directory %s: %w", dir, err)
			}
			return checkExisting(dir, fi)
		}
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("socket directory %s was replaced by uid %d while it was created", dir, st.Uid)
	}
	if err := unix.Fchmod(fd, uint32(perm.Perm())); err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	return nil
}

// prefixes returns "/", "/a", "/a/b" for the absolute, clean path /a/b.
func prefixes(p string) []string {
	p = filepath.Clean(p)
	out := []string{"/"}
	cur := ""
	for _, part := range strings.Split(strings.TrimPrefix(p, "/"), "/") {
		if part == "" {
			continue
		}
		cur += "/" + part
		out = append(out, cur)
	}
	return out
}

// Unreachable returns the first directory above the socket at path that
// other users cannot search (no o+x), or "" when every local user can reach
// it. The workload socket is meant for every user; the server warns when
// it is not.
func Unreachable(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return ""
	}
	for _, p := range prefixes(filepath.Dir(abs)) {
		fi, err := os.Stat(p)
		if err != nil {
			return p
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return p
		}
	}
	return ""
}
