package kek

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadOrCreate_CreatesThenLoads(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nested", "secrets")
	path := filepath.Join(dir, "kek")

	k1, created, err := LoadOrCreate(path)
	if err != nil || !created {
		t.Fatalf("first LoadOrCreate: created=%v err=%v", created, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("key file mode %#o, want 0600", perm)
	}
	di, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := di.Mode().Perm(); perm != 0o700 {
		t.Errorf("created directory mode %#o, want 0700", perm)
	}
	data, _ := os.ReadFile(path)
	if len(data) != 65 || data[64] != '\n' {
		t.Errorf("key file is %q, want 64 hex chars and a newline", data)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d files, want only the key (temp file left behind?)", len(entries))
	}

	k2, created, err := LoadOrCreate(path)
	if err != nil || created {
		t.Fatalf("second LoadOrCreate: created=%v err=%v", created, err)
	}
	sealed, err := k1.Seal([]byte("ca private key"), []byte("ca-1"))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := k2.Open(sealed, []byte("ca-1"))
	if err != nil || string(pt) != "ca private key" {
		t.Fatalf("reloaded key cannot open: %q, %v", pt, err)
	}
}

func TestLoad_Formats(t *testing.T) {
	const hexKey = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		wantErr string // substring; empty means success
	}{
		{"hex", hexKey, 0o600, ""},
		{"hex newline", hexKey + "\n", 0o600, ""},
		{"hex crlf", hexKey + "\r\n", 0o600, ""},
		{"upper hex", strings.ToUpper(hexKey), 0o400, ""},
		{"group readable", hexKey, 0o640, "accessible by group or others"},
		{"world readable", hexKey, 0o604, "accessible by group or others"},
		{"short", hexKey[:62], 0o600, "want 64 hex characters"},
		{"raw bytes", string(bytes.Repeat([]byte{0xAB}, 32)), 0o600, "want 64 hex characters"},
		{"not hex", strings.Repeat("zz", 32), 0o600, "invalid byte"},
		{"two newlines", hexKey + "\n\n", 0o600, "want 64 hex characters"},
		{"empty", "", 0o600, "want 64 hex characters"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kek")
			if err := os.WriteFile(path, []byte(tc.content), tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.mode); err != nil { // umask-proof
				t.Fatal(err)
			}
			k, created, err := LoadOrCreate(path)
			if created {
				t.Error("created = true for an existing file")
			}
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if k == nil {
					t.Fatal("nil KEK")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			after, _ := os.ReadFile(path)
			if string(after) != tc.content {
				t.Error("a refused key file was modified")
			}
		})
	}
}

func TestLoad_NotRegular(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kek")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(path); err == nil {
		t.Fatal("a directory was accepted as a key file")
	}
}

func TestSealOpen(t *testing.T) {
	k1 := mustNew(t, 1)
	k2 := mustNew(t, 2)
	sealed, err := k1.Seal([]byte("secret"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	flipped := func(i int) []byte {
		c := bytes.Clone(sealed)
		c[i] ^= 1
		return c
	}
	tests := []struct {
		name       string
		k          *KEK
		ciphertext []byte
		aad        []byte
		wantErr    bool
	}{
		{"round trip", k1, sealed, []byte("aad"), false},
		{"wrong key", k2, sealed, []byte("aad"), true},
		{"wrong aad", k1, sealed, []byte("other"), true},
		{"nil aad", k1, sealed, nil, true},
		{"version byte altered", k1, flipped(0), []byte("aad"), true},
		{"nonce altered", k1, flipped(1), []byte("aad"), true},
		{"ciphertext altered", k1, flipped(1 + nonceSize), []byte("aad"), true},
		{"tag altered", k1, flipped(len(sealed) - 1), []byte("aad"), true},
		{"truncated", k1, sealed[:1+nonceSize+15], []byte("aad"), true},
		{"empty", k1, nil, []byte("aad"), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pt, err := tc.k.Open(tc.ciphertext, tc.aad)
			if !tc.wantErr {
				if err != nil || string(pt) != "secret" {
					t.Fatalf("Open = %q, %v", pt, err)
				}
				return
			}
			if !errors.Is(err, ErrDecrypt) {
				t.Fatalf("Open error %v, want ErrDecrypt", err)
			}
			if !strings.Contains(err.Error(), "wrong --kek-file or corrupted key") {
				t.Errorf("error %q does not tell the operator what to check", err)
			}
		})
	}
}

func TestSeal_Layout(t *testing.T) {
	k := mustNew(t, 1)
	a, _ := k.Seal([]byte("same"), nil)
	b, _ := k.Seal([]byte("same"), nil)
	if a[0] != sealV1 {
		t.Errorf("version byte %d, want %d", a[0], sealV1)
	}
	if len(a) != 1+nonceSize+len("same")+16 {
		t.Errorf("sealed length %d", len(a))
	}
	if bytes.Equal(a[1:1+nonceSize], b[1:1+nonceSize]) {
		t.Error("two seals used the same nonce")
	}
	pt, err := k.Open(a, nil)
	if err != nil || string(pt) != "same" {
		t.Fatalf("Open = %q, %v", pt, err)
	}
	empty, _ := k.Seal(nil, nil)
	if pt, err := k.Open(empty, nil); err != nil || len(pt) != 0 {
		t.Fatalf("empty plaintext: %q, %v", pt, err)
	}
}

func TestNew_KeySize(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33} {
		if _, err := New(make([]byte, n)); err == nil {
			t.Errorf("New accepted a %d-byte key", n)
		}
	}
}

func mustNew(t *testing.T, fill byte) *KEK {
	t.Helper()
	k, err := New(bytes.Repeat([]byte{fill}, KeySize))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestLoadOrCreateUnlessSealed(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kek")
	// Missing file, store with sealed keys: refused, nothing created.
	_, _, err := LoadOrCreateUnlessSealed(path, func() (bool, error) { return true, nil })
	want := "KEK file " + path + " is missing but the store holds sealed CA keys"
	if !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), want) {
		t.Fatalf("missing KEK with sealed keys: %v, want %q", err, want)
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a key file was created: %v", err)
	}
	// The store cannot be read: refused too, nothing created.
	boom := errors.New("boom")
	if _, _, err := LoadOrCreateUnlessSealed(path, func() (bool, error) { return false, boom }); !errors.Is(err, boom) {
		t.Fatalf("store error: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a key file was created: %v", err)
	}
	// A new store: created, and the next call loads it without asking.
	k1, created, err := LoadOrCreateUnlessSealed(path, func() (bool, error) { return false, nil })
	if err != nil || !created {
		t.Fatalf("new store: created=%v err=%v", created, err)
	}
	k2, created, err := LoadOrCreateUnlessSealed(path, func() (bool, error) { t.Fatal("asked the store although the file exists"); return true, nil })
	if err != nil || created {
		t.Fatalf("existing file: created=%v err=%v", created, err)
	}
	sealed, err := k1.Seal([]byte("ca key"), []byte("ca-1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k2.Open(sealed, []byte("ca-1")); err != nil {
		t.Fatalf("reloaded key does not open what the created one sealed: %v", err)
	}
}
