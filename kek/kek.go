// Package kek holds the key-encryption key that seals CA private keys before
// they reach the store, so that a copy of the data dir (a backup, a stolen
// volume snapshot) without the KEK file reveals no signing key.
//
// # Key file format
//
// The file holds the 32-byte AES-256 key as exactly 64 lowercase or uppercase
// hex characters, optionally followed by one newline ("\n" or "\r\n").
// Hex rather than raw bytes so that the file can be made, inspected and put
// into a Kubernetes Secret with ordinary tools, e.g.
//
//	(umask 077; openssl rand -hex 32 > kek)
//
// The file must be a regular file without group or other permission bits
// (like ssh with private keys); anything else is refused rather than used.
//
// # Sealed format
//
//	version (1 byte, 0x01) | nonce (12 bytes, random) | AES-256-GCM ciphertext and tag
//
// The version byte is also authenticated (it is prepended to the caller's
// additional data), so it cannot be altered to steer Open to another layout.
package kek

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/meshid/meshid/internal/fsutil"
)

// KeySize is the length of the key in bytes (AES-256).
const KeySize = 32

const (
	sealV1    byte = 1
	nonceSize      = 12
	// Large enough for the hex form, its newline and a stray byte or two, so
	// a wrong file (a certificate, say) is refused without reading it all.
	maxFileSize = 2*KeySize + 4
)

// ErrDecrypt is returned by Open when the ciphertext does not authenticate:
// the KEK is not the one that sealed it, the additional data differs, or the
// sealed bytes were altered.
var ErrDecrypt = errors.New("wrong --kek-file or corrupted key")

// KEK seals and opens small secrets with AES-256-GCM. It is safe for
// concurrent use.
type KEK struct {
	aead cipher.AEAD
}

// New builds a KEK from a 32-byte key.
func New(key []byte) (*KEK, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("kek: key is %d bytes, want %d", len(key), KeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("kek: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("kek: %w", err)
	}
	return &KEK{aead: aead}, nil
}

// LoadOrCreate reads the key file at path or, if there is none, creates one
// with a fresh random key (mode 0600; missing parent directories are created
// 0700). created reports whether a new key was made, which the caller should
// log loudly: losing that file makes every sealed CA key unrecoverable.
func LoadOrCreate(path string) (k *KEK, created bool, err error) {
	k, err = load(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, err
	}
	k, err = create(path)
	if errors.Is(err, fs.ErrExist) {
		// Another process created it between our read and our create; use
		// theirs, never overwrite it.
		k, err = load(path)
		return k, false, err
	}
	if err != nil {
		return nil, false, err
	}
	return k, true, nil
}

// LoadOrCreateUnlessSealed is LoadOrCreate for a key whose store may
// already hold data sealed under it. If the key file is missing and
// hasSealed reports that the store holds sealed keys, no key is created:
// a fresh one could never open them, and making it would only hide that
// the real file was lost (a wrong --kek-file, a volume mounted without its
// Secret). The error says so, naming the file.
func LoadOrCreateUnlessSealed(path string, hasSealed func() (bool, error)) (k *KEK, created bool, err error) {
	k, err = load(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, err
	}
	sealed, err := hasSealed()
	if err != nil {
		return nil, false, fmt.Errorf("kek file %s is missing; checking the store for sealed keys: %w", path, err)
	}
	if sealed {
		return nil, false, fmt.Errorf("KEK file %s is missing but the store holds sealed CA keys; restore the file (or point --kek-file at it), a new key cannot open them: %w", path, ErrMissing)
	}
	return LoadOrCreate(path)
}

// ErrMissing is returned by LoadOrCreateUnlessSealed when the key file is
// absent although the store holds keys sealed under it.
var ErrMissing = errors.New("key-encryption key missing for sealed keys")

// Load reads an existing key file; it never creates one. Replicas sharing
// one store share one key: a replica that made its own could not open the
// CA keys the others sealed.
func Load(path string) (*KEK, error) { return load(path) }

// Create writes a new key file at path (0600) and fails if one exists.
func Create(path string) (*KEK, error) { return create(path) }

func load(path string) (*KEK, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kek file: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the checks apply to what we read.
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kek file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("kek file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("kek file %s has permissions %#o and is accessible by group or others; refusing to use it (chmod 600 %s)", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("kek file %s: read: %w", path, err)
	}
	key, err := parseKey(data)
	if err != nil {
		return nil, fmt.Errorf("kek file %s: %w", path, err)
	}
	return New(key)
}

func parseKey(data []byte) ([]byte, error) {
	data = bytes.TrimSuffix(data, []byte("\n"))
	data = bytes.TrimSuffix(data, []byte("\r"))
	if len(data) != 2*KeySize {
		return nil, fmt.Errorf("want %d hex characters and an optional newline, found %d bytes", 2*KeySize, len(data))
	}
	key := make([]byte, KeySize)
	if _, err := hex.Decode(key, data); err != nil {
		return nil, fmt.Errorf("want %d hex characters: %w", 2*KeySize, err)
	}
	return key, nil
}

// create writes a new key with fsutil.WriteFileExclusive: the data is on
// disk before the name appears, so a crash can never leave a truncated key
// file at path that would then block every start-up, and the directory is
// flushed so the name survives too (else the next start would make a
// second key and orphan everything sealed with this one). Like O_EXCL it
// refuses an existing file.
func create(path string) (*KEK, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kek file: create directory: %w", err)
	}
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("kek: generate key: %w", err)
	}
	if err := fsutil.WriteFileExclusive(path, []byte(hex.EncodeToString(key)+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("kek file: %w", err)
	}
	return New(key)
}

// Seal encrypts plaintext bound to aad (e.g. the CA ID, so a sealed key
// cannot be swapped onto another CA record). Each call uses a fresh random
// nonce; at the handful of CA keys meshid seals, the 2^32-message limit for
// random GCM nonces is out of reach.
func (k *KEK) Seal(plaintext, aad []byte) ([]byte, error) {
	out := make([]byte, 1+nonceSize, 1+nonceSize+len(plaintext)+k.aead.Overhead())
	out[0] = sealV1
	if _, err := rand.Read(out[1 : 1+nonceSize]); err != nil {
		return nil, fmt.Errorf("kek: seal: nonce: %w", err)
	}
	return k.aead.Seal(out, out[1:1+nonceSize], plaintext, withVersion(sealV1, aad)), nil
}

// Open decrypts what Seal produced with the same aad. It returns an error
// wrapping ErrDecrypt if the data does not authenticate.
func (k *KEK) Open(ciphertext, aad []byte) ([]byte, error) {
	if len(ciphertext) < 1+nonceSize+k.aead.Overhead() {
		return nil, fmt.Errorf("kek: open: sealed data is %d bytes, too short: %w", len(ciphertext), ErrDecrypt)
	}
	if v := ciphertext[0]; v != sealV1 {
		return nil, fmt.Errorf("kek: open: unknown sealed format version %d: %w", v, ErrDecrypt)
	}
	nonce := ciphertext[1 : 1+nonceSize]
	pt, err := k.aead.Open(nil, nonce, ciphertext[1+nonceSize:], withVersion(sealV1, aad))
	if err != nil {
		return nil, fmt.Errorf("kek: open: authentication failed: %w", ErrDecrypt)
	}
	return pt, nil
}

func withVersion(v byte, aad []byte) []byte {
	return append([]byte{v}, aad...)
}
