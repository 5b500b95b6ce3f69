package agent

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/fsutil"
)

// Files in the data dir. The node key and SVID let a restarted agent
// reconnect without a new join token; the bundle is the last one the
// server sent, the trust a restart starts from.
const (
	nodeKeyFile  = "node.key"
	nodeCertFile = "node.crt"
	bundleFile   = "bundle.pem"
	lockFile     = "lock"
)

// dataDir is the agent's directory, held exclusively (flock) while the
// agent runs: a second agent on it would attest twice and fight over the
// node SVID.
type dataDir struct {
	path string
	lock *os.File
}

// openDataDir makes (0700) and locks dir. A directory that another user
// owns or others may write is refused: whoever can write it can replace
// the node key.
func openDataDir(dir string) (*dataDir, error) {
	if dir == "" {
		return nil, errors.New("data dir is required")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("data dir %s: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	fi, err := os.Lstat(abs)
	if err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("data dir %s is not a directory", abs)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("data dir %s is owned by uid %d, not by this agent's uid %d", abs, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("data dir %s is writable by group or others (mode %s): make it 0700", abs, fi.Mode().Perm())
	}
	f, err := os.OpenFile(filepath.Join(abs, lockFile), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data dir lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("data dir %s is in use by another agent", abs)
		}
		return nil, fmt.Errorf("lock data dir %s: %w", abs, err)
	}
	return &dataDir{path: abs, lock: f}, nil
}

func (d *dataDir) close() { d.lock.Close() }

func (d *dataDir) file(name string) string { return filepath.Join(d.path, name) }

// nodeIdentity is the agent's node SVID with its key.
type nodeIdentity struct {
	id    spiffeid.ID
	key   crypto.Signer
	chain []*x509.Certificate
}

func (n *nodeIdentity) tlsCert() *tls.Certificate {
	c := &tls.Certificate{PrivateKey: n.key, Leaf: n.chain[0]}
	for _, x := range n.chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// newNodeKey makes a node key and a CSR for it.
func newNodeKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("node key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("node csr: %w", err)
	}
	return key, csr, nil
}

// parseNode checks that chain (DER, leaf first) is an SVID for key.
func parseNode(key crypto.Signer, chainDER [][]byte) (*nodeIdentity, error) {
	if len(chainDER) == 0 {
		return nil, errors.New("empty node SVID")
	}
	var chain []*x509.Certificate
	for _, der := range chainDER {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("node SVID: %w", err)
		}
		chain = append(chain, c)
	}
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return nil, fmt.Errorf("node SVID: %w", err)
	}
	pub, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("node SVID is not for the node key")
	}
	return &nodeIdentity{id: id, key: key, chain: chain}, nil
}

// saveNode writes the node key and SVID (0600). The key is written first:
// a crash between the two leaves a key without its SVID, which loadNode
// reports as absent (the agent then needs a token), never an SVID for a
// key that is gone.
func (d *dataDir) saveNode(n *nodeIdentity) error {
	der, err := x509.MarshalPKCS8PrivateKey(n.key)
	if err != nil {
		return fmt.Errorf("marshal node key: %w", err)
	}
	if err := fsutil.WriteFileAtomic(d.file(nodeKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	var ders [][]byte
	for _, c := range n.chain {
		ders = append(ders, c.Raw)
	}
	return fsutil.WriteFileAtomic(d.file(nodeCertFile), ca.EncodeCertsPEM(ders...), 0o600)
}

// loadNode reads the node identity; (nil, nil) if there is none yet.
func (d *dataDir) loadNode() (*nodeIdentity, error) {
	keyPEM, err := os.ReadFile(d.file(nodeKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("node key: %w", err)
	}
	certPEM, err := os.ReadFile(d.file(nodeCertFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("node SVID: %w", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, fmt.Errorf("node key %s: not PEM", d.file(nodeKeyFile))
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("node key: %w", err)
	}
	key, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("node key of type %T cannot sign", k)
	}
	var ders [][]byte
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		ders = append(ders, b.Bytes)
	}
	return parseNode(key, ders)
}

// saveBundle keeps the last trust bundle (PEM) for the next start.
func (d *dataDir) saveBundle(pemBytes []byte) error {
	return fsutil.WriteFileAtomic(d.file(bundleFile), pemBytes, 0o600)
}

// loadBundle reads the saved bundle; nil if there is none.
func (d *dataDir) loadBundle() ([]*x509.Certificate, error) {
	b, err := os.ReadFile(d.file(bundleFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseBundlePEM(b)
}

// ParseBundlePEM reads PEM certificates (a trust bundle file).
func ParseBundlePEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("trust bundle: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("trust bundle holds no certificate")
	}
	return out, nil
}
