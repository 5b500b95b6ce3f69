package agent

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/internal/fsutil"
	"github.com/meshid/meshid/kek"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/svidcache"
)

// The persisted SVID cache: what the agent serves, kept in the data dir so
// that a restart while the server is unreachable does not leave the node's
// workloads with nothing (SPIRE's agent purges its cache on restart).
// It holds private keys, so it is sealed (AES-256-GCM, package kek) under a
// key file that can live apart from the data dir: a copy of the data dir
// alone (a backup, a volume snapshot) then reveals no workload key.
const (
	// CacheFile is the sealed cache's name in the data dir.
	CacheFile = "svid-cache.sealed"
	// DefaultCacheKeyFile is the key file's name in the data dir when
	// Config.CacheKeyFile is empty.
	DefaultCacheKeyFile = "cache.kek"
	// persistInterval coalesces writes: a node renewing 10,000 SVIDs at
	// once writes the file about once a second, not 10,000 times.
	persistInterval = time.Second
	cacheVersion    = 1
)

// cacheAAD binds the sealed bytes to their use: a sealed CA key (the same
// KEK format) cannot be passed off as a cache, nor the other way round.
var cacheAAD = []byte("meshid agent svid cache v1")

// DefaultAvailabilityTarget is Config.AvailabilityTarget's default: every
// SVID is renewed with at least 12 h (or half its life) left, the time the
// node's workloads stay valid if the server vanishes.
const DefaultAvailabilityTarget = 12 * time.Hour

// persistedCache is the sealed file's plaintext (JSON).
type persistedCache struct {
	Version int           `json:"version"`
	SavedAt time.Time     `json:"saved_at"`
	Entries []entry.Entry `json:"entries"`
	// Bundle is the last agentv1.Bundle the server sent (proto).
	Bundle []byte          `json:"bundle,omitempty"`
	SVIDs  []persistedSVID `json:"svids"`
}

type persistedSVID struct {
	Entry svidcache.Entry `json:"entry"`
	Chain [][]byte        `json:"chain"` // DER, leaf first
	Key   []byte          `json:"key"`   // PKCS#8
}

// persister writes the sealed cache, coalesced on the agent's clock.
type persister struct {
	a    *Agent
	kek  *kek.KEK
	path string

	mu     sync.Mutex
	armed  bool
	stop   func() bool
	closed bool
	timers sync.WaitGroup // an armed or running write timer

	writeMu sync.Mutex // one write at a time
	// saved is how many X.509-SVIDs the sealed file on disk holds: what a
	// restart during a server outage would serve.
	saved atomic.Int64
}

// openPersister loads (or makes, 0600) the cache key. With persistence
// off it removes a cache left by an earlier run: it holds keys nobody
// would use or rotate any more.
func openPersister(a *Agent) (*persister, error) {
	path := a.dir.file(CacheFile)
	if a.cfg.NoPersistCache {
		if err := os.Remove(path); err == nil {
			a.log.Info("persisted SVID cache turned off: removed the one an earlier run left", "file", path)
		} else if !errors.Is(err, fs.ErrNotExist) {
			a.log.Warn("persisted SVID cache turned off, but could not remove the old one", "file", path, "err", err)
		}
		return nil, nil
	}
	keyFile := a.cfg.CacheKeyFile
	if keyFile == "" {
		keyFile = a.dir.file(DefaultCacheKeyFile)
	}
	k, created, err := kek.LoadOrCreate(keyFile)
	if err != nil {
		return nil, fmt.Errorf("svid cache key (--cache-key-file): %w", err)
	}
	if created {
		a.log.Info("made a new key for the persisted SVID cache", "key_file", keyFile)
	}
	return &persister{a: a, kek: k, path: path}, nil
}

// kick schedules a write. It is called with the cache's lock held
// (svidcache OnChange), so it only arms a timer.
func (p *persister) kick() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.armed {
		return
	}
	p.armed = true
	p.timers.Add(1)
	p.stop = p.a.cfg.AfterFunc(persistInterval, func() {
		defer p.timers.Done()
		p.mu.Lock()
		p.armed = false
		closed := p.closed
		p.mu.Unlock()
		if !closed {
			p.save()
		}
	})
}

// discard stops persisting for good and removes the file: what it holds
// was revoked (the agent was banned), and a restart during an outage must
// not serve it again.
func (p *persister) discard() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	p.closed = true
	if p.armed && p.stop() {
		p.timers.Done()
	}
	p.armed = false
	p.mu.Unlock()
	p.timers.Wait()
	p.writeMu.Lock() // a write in progress lands before the removal
	defer p.writeMu.Unlock()
	if err := os.Remove(p.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// close stops the timer and writes what is pending, so a clean stop leaves
// the latest state on disk.
func (p *persister) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.closed = true
	pending := p.armed
	if p.armed && p.stop() {
		p.timers.Done()
	}
	p.armed = false
	p.mu.Unlock()
	p.timers.Wait()
	if pending {
		p.save()
	}
}

// save seals and writes the cache (atomically, 0600). A failure is logged:
// serving goes on, only a restart would start emptier.
func (p *persister) save() {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	if err := p.write(); err != nil {
		p.a.log.Error("could not persist the SVID cache", "file", p.path, "err", err)
	}
}

func (p *persister) write() error {
	a := p.a
	pc := persistedCache{Version: cacheVersion, SavedAt: a.cfg.Now().UTC()}
	for _, id := range a.index.IDs() {
		if e, ok := a.index.Get(id); ok {
			pc.Entries = append(pc.Entries, e)
		}
	}
	a.mu.Lock()
	b := a.lastBundle
	a.mu.Unlock()
	if b != nil {
		raw, err := proto.Marshal(b)
		if err != nil {
			return fmt.Errorf("marshal bundle: %w", err)
		}
		pc.Bundle = raw
	}
	for _, h := range a.cache.Held() {
		if _, ok := a.index.Get(h.Entry.ID); !ok {
			continue // its entry is gone: no workload will hold it again
		}
		ps := persistedSVID{Entry: h.Entry, Key: h.SVID.KeyDER}
		for _, c := range h.SVID.Certs {
			ps.Chain = append(ps.Chain, c.Raw)
		}
		pc.SVIDs = append(pc.SVIDs, ps)
	}
	plain, err := json.Marshal(pc)
	if err != nil {
		return fmt.Errorf("marshal: %w", err)
	}
	sealed, err := p.kek.Seal(plain, cacheAAD)
	clear(plain)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(p.path, sealed, 0o600); err != nil {
		return err
	}
	p.saved.Store(int64(len(pc.SVIDs)))
	return nil
}

// load reads the sealed cache; (nil, nil) if there is none.
func (p *persister) load() (*persistedCache, error) {
	sealed, err := os.ReadFile(p.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	plain, err := p.kek.Open(sealed, cacheAAD)
	if err != nil {
		return nil, fmt.Errorf("%w (sealed under another --cache-key-file, or damaged)", err)
	}
	defer clear(plain)
	var pc persistedCache
	if err := json.Unmarshal(plain, &pc); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if pc.Version != cacheVersion {
		return nil, fmt.Errorf("format version %d, this agent reads %d", pc.Version, cacheVersion)
	}
	p.saved.Store(int64(len(pc.SVIDs)))
	return &pc, nil
}

// restore serves what the previous run persisted, before the server is
// reached: its entries (so the matcher knows which workload holds what),
// its bundle, and every still-valid SVID. A file that cannot be read is
// logged and ignored: the agent starts empty, as without persistence.
func (a *Agent) restore() {
	pc, err := a.persist.load()
	if err != nil {
		a.log.Warn("persisted SVID cache ignored: starting empty", "file", a.persist.path, "err", err)
		return
	}
	if pc == nil {
		return
	}
	for _, e := range pc.Entries {
		a.index.Put(e)
	}
	if len(pc.Bundle) > 0 {
		b := &agentv1.Bundle{}
		if err := proto.Unmarshal(pc.Bundle, b); err != nil {
			a.log.Warn("persisted bundle ignored", "err", err)
		} else if err := a.serveBundle(b); err != nil {
			a.log.Warn("persisted bundle ignored", "err", err)
		}
	}
	now := a.cfg.Now()
	seeded, expired := 0, 0
	for _, ps := range pc.SVIDs {
		err := a.seed(ps)
		switch {
		case err == nil:
			seeded++
		case errors.Is(err, svidcache.ErrExpired):
			expired++
		default:
			a.log.Warn("persisted SVID ignored", "entry_id", ps.Entry.ID, "spiffe_id", ps.Entry.SpiffeID, "err", err)
		}
	}
	a.log.Info("serving the persisted SVID cache until the server is reached", "svids", seeded, "expired_dropped", expired,
		"entries", len(pc.Entries), "saved", pc.SavedAt, "age", now.Sub(pc.SavedAt).Truncate(time.Second))
}

func (a *Agent) seed(ps persistedSVID) error {
	k, err := x509.ParsePKCS8PrivateKey(ps.Key)
	if err != nil {
		return fmt.Errorf("key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return fmt.Errorf("key of type %T", k)
	}
	return a.cache.Seed(ps.Entry, ps.Chain, key)
}

// serveBundle publishes a bundle from the server to the workloads (and
// keeps it for the persisted cache).
func (a *Agent) serveBundle(b *agentv1.Bundle) error {
	var certs []*x509.Certificate
	for _, der := range b.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("bundle: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return errors.New("bundle holds no CA")
	}
	a.mu.Lock()
	a.lastBundle = b
	a.mu.Unlock()
	a.cache.SetBundles(svidcache.X509Bundle(a.td, certs, b.GetCrls(), b.GetCrlLeafOnly()),
		&identity.JWTBundle{TrustDomain: a.td, JWKS: b.GetJwks(), Version: b.GetJwtVersion()})
	return nil
}

// boundBackoff shortens a reconnection delay as the outage budget runs
// out: with little SVID life left, the moment the server is back must not
// be missed by a 30 s backoff step.
func (a *Agent) boundBackoff(d time.Duration) time.Duration {
	if a.cache.Expired() > 0 {
		// Workloads are already without an identity: every second counts,
		// but a fleet of agents must not hammer a recovering server.
		return min(d, expiredBackoff)
	}
	now := a.cfg.Now()
	earliest, _, served := a.cache.Stats(now)
	if served == 0 {
		return d
	}
	return min(d, max(earliest.Sub(now)/8, minBackoff))
}

// expiredBackoff bounds reconnection delays once an identity has expired.
const expiredBackoff = 5 * time.Second
