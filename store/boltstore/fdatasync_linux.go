package boltstore

import (
	"os"

	"golang.org/x/sys/unix"
)

// fdatasync flushes f's data, and only the metadata needed to read it back;
// on a pre-allocated WAL segment that is no metadata at all (see wal.go).
func fdatasync(f *os.File) error {
	return unix.Fdatasync(int(f.Fd()))
}
