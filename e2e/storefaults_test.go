package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A server whose data dir lost its KEK file, or whose store file was
// truncated, exits 1 with one line that names the file.
func TestServerRefusesDamagedDataDir(t *testing.T) {
	dir := t.TempDir()
	sd := sockDir(t)
	args := []string{"server", "--data-dir", dir, "--admin-socket", filepath.Join(sd, "a.sock"), "--socket", filepath.Join(sd, "w.sock")}
	first := startMeshid(t, args...)
	first.waitFor(t, "msg=serving")
	first.signal(t, syscall.SIGTERM)
	if code := first.wait(t); code != 0 {
		t.Fatalf("first server exit %d:\n%s", code, first.output())
	}

	kekPath := filepath.Join(dir, "kek")
	kek, err := os.ReadFile(kekPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(kekPath); err != nil {
		t.Fatal(err)
	}
	p := startMeshid(t, args...)
	if code := p.wait(t); code != 1 {
		t.Fatalf("server without its KEK file: exit %d, want 1:\n%s", code, p.output())
	}
	if want := fmt.Sprintf("KEK file %s is missing but the store holds sealed CA keys", kekPath); !strings.Contains(p.output(), want) {
		t.Fatalf("output does not say %q:\n%s", want, p.output())
	}
	if _, err := os.Stat(kekPath); err == nil {
		t.Fatal("the server created a new KEK file")
	}
	if err := os.WriteFile(kekPath, kek, 0o600); err != nil {
		t.Fatal(err)
	}

	db := filepath.Join(dir, "meshid.db")
	fi, err := os.Stat(db)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(db, fi.Size()/2); err != nil {
		t.Fatal(err)
	}
	p = startMeshid(t, args...)
	if code := p.wait(t); code != 1 {
		t.Fatalf("server on a truncated store: exit %d, want 1:\n%s", code, p.output())
	}
	var errLines []string
	for _, l := range strings.Split(strings.TrimSpace(p.output()), "\n") {
		if strings.Contains(l, db) && strings.Contains(l, "truncated") {
			errLines = append(errLines, l)
		}
		if strings.Contains(l, "goroutine ") || strings.Contains(l, "SIGBUS") || strings.Contains(l, "panic") {
			t.Fatalf("server crashed on a truncated store:\n%s", p.output())
		}
	}
	if len(errLines) != 1 {
		t.Fatalf("want one line naming %s as truncated:\n%s", db, p.output())
	}
}
