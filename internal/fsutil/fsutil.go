// Package fsutil writes files so that a reader or a crash never finds one
// half-written: the data goes to a temporary file in the same directory,
// is flushed to disk, is put in place by one rename (or link), and the
// directory is flushed too so the new name survives a power cut. kek, the
// helper, the CLI and the store share it rather than each keep a copy.
package fsutil

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// syncDirHook is SyncDir; a test wraps it to see that the directory is
// flushed after the rename.
var syncDirHook = SyncDir

// WriteFileAtomic replaces path with data, mode exactly perm whatever the
// umask. A reader sees the old file or the new one, never a part; after a
// crash path holds one or the other. On error path is unchanged and the
// temporary file is gone.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := syncDirHook(filepath.Dir(path)); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// WriteFileExclusive creates path with data, mode exactly perm, and fails
// with an error wrapping fs.ErrExist if path already exists. Unlike an
// O_EXCL open of path itself, a crash can never leave a truncated file at
// path: the data is complete on disk before the name appears (a hard link
// from the temporary file, which, like O_EXCL, refuses to replace).
func WriteFileExclusive(path string, data []byte, perm fs.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, path); err != nil {
		var le *os.LinkError
		if errors.As(err, &le) && errors.Is(le.Err, fs.ErrExist) {
			return fmt.Errorf("create %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := syncDirHook(filepath.Dir(path)); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	return nil
}

// SyncDir flushes dir, making renames, links and removals in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// writeTemp writes data to a new file beside path, flushed, mode perm, and
// returns its name. The file is created with O_EXCL (a name someone else
// planted is never written through) and only perm's owner bits, so it is
// never more open than the result, and is then set to perm exactly with
// fchmod, which the umask does not touch.
func writeTemp(path string, data []byte, perm fs.FileMode) (name string, err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	var f *os.File
	for range 10 {
		var rnd [8]byte
		if _, err := rand.Read(rnd[:]); err != nil {
			return "", fmt.Errorf("write %s: %w", path, err)
		}
		name = filepath.Join(dir, "."+base+"."+hex.EncodeToString(rnd[:])+".tmp")
		f, err = os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm.Perm()&0o700)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(name)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return name, nil
}
