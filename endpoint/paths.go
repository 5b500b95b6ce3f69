package endpoint

import (
	"os"
	"path/filepath"
	"strconv"
)

// Layout is where a server's sockets go by default: the admin socket in a
// private (0700) directory, the workload socket in a public (0755) one,
// siblings under one base directory (0755), as SPIRE lays out its sockets.
type Layout struct {
	Base        string
	AdminSocket string
	Socket      string
}

// Default modes of the default layout's directories and sockets.
const (
	AdminDirPerm     os.FileMode = 0o700
	AdminSocketPerm  os.FileMode = 0o600
	PublicDirPerm    os.FileMode = 0o755
	PublicSocketPerm os.FileMode = 0o666
)

// DefaultLayout is the layout for this process: under /run/meshid as root;
// otherwise under $XDG_RUNTIME_DIR/meshid, or /tmp/meshid-<uid> without it.
func DefaultLayout() Layout {
	return LayoutFor(os.Geteuid(), os.Getenv("XDG_RUNTIME_DIR"))
}

// LayoutFor is DefaultLayout for a given effective uid and XDG_RUNTIME_DIR.
func LayoutFor(euid int, xdgRuntimeDir string) Layout {
	var base string
	switch {
	case euid == 0:
		base = "/run/meshid"
	case xdgRuntimeDir != "" && filepath.IsAbs(xdgRuntimeDir):
		base = filepath.Join(xdgRuntimeDir, "meshid")
	default:
		base = "/tmp/meshid-" + strconv.Itoa(euid)
	}
	return LayoutUnder(base)
}

// LayoutUnder is the layout with base as its base directory.
func LayoutUnder(base string) Layout {
	return Layout{
		Base:        base,
		AdminSocket: filepath.Join(base, "admin", "admin.sock"),
		Socket:      filepath.Join(base, "workload", "workload.sock"),
	}
}
