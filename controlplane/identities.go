package controlplane

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

// Renewal policy: an SVID is replaced at half its life, ±10% jitter so that
// thousands of proxies minted together do not all renew in the same second.
const (
	renewFraction = 0.5
	renewJitter   = 0.1
	// Failed renewals retry with exponential backoff from minRetry to
	// maxRetry; the SVID in hand stays valid meanwhile.
	minRetry = time.Second
	maxRetry = time.Minute
)

// identities keeps, for every registration entry some connected workload is
// entitled to, a current X.509-SVID whose key the server made, renews it
// before it expires, and tells every subscriber holding it.
type identities struct {
	srv *Server

	// entMu makes "work out a caller's entitlements, then take its slots"
	// one step, for Subscribe and entriesChanged alike: otherwise a
	// subscriber computing from an entry being deleted could register
	// after the deletion's re-match and keep (and renew) it.
	entMu sync.Mutex

	mu        sync.Mutex
	slots     map[string]*slot // by entry ID ("id:<spiffe id>" for direct IDs)
	subs      map[*Subscription]struct{}
	bundle    *identity.Bundle
	jwtBundle *identity.JWTBundle
	// banned are directly held IDs (certificate or token callers) revoked
	// by SPIFFE ID: not served again until a new token is made for them.
	banned map[string]bool
	closed bool
	// lin knows the entry behind each live certificate (lineage.go).
	lin lineage
	// jwtRev refuses JWT-SVIDs of revoked identities (jwtrevoke.go).
	jwtRev jwtRevocations
}

// slot is one entry's live SVID.
type slot struct {
	entry   store.Entry
	svid    *identity.SVID
	renewAt time.Time
	refs    int
	stop    func() bool // cancels the renewal timer
	retry   time.Duration
	// subs are the subscriptions holding this slot, told when it changes.
	subs map[*Subscription]struct{}
}

func newIdentities(srv *Server) *identities {
	return &identities{srv: srv, slots: map[string]*slot{}, subs: map[*Subscription]struct{}{}, banned: map[string]bool{}}
}

// Subscription is one caller's live view of its identities. Changed is
// signalled (coalesced: one pending signal at most) whenever Snapshot has
// something new.
type Subscription struct {
	ids     *identities
	caller  identity.Caller
	extra   []store.Entry
	entries []string // slot keys, in snapshot order
	snap    *identity.Snapshot
	ch      chan struct{}
	once    sync.Once
	// err, once set, ends the subscription for its holder (endLocked).
	err error
}

// Snapshot returns the caller's current identities and bundles.
func (s *Subscription) Snapshot() *identity.Snapshot {
	s.ids.mu.Lock()
	defer s.ids.mu.Unlock()
	return s.snap
}

// Changed is signalled whenever Snapshot changes.
func (s *Subscription) Changed() <-chan struct{} { return s.ch }

// Err is non-nil once the subscription has been ended by the server: the
// credential the caller authenticated with, or the identity it held, was
// revoked. Changed is signalled when that happens; the caller must
// authenticate again (with a join token) to be served.
func (s *Subscription) Err() error {
	s.ids.mu.Lock()
	defer s.ids.mu.Unlock()
	return s.err
}

// Close ends the subscription; SVIDs nobody holds stop being renewed.
func (s *Subscription) Close() {
	s.once.Do(func() {
		ids := s.ids
		ids.mu.Lock()
		defer ids.mu.Unlock()
		delete(ids.subs, s)
		for _, k := range s.entries {
			ids.release(k, s)
		}
	})
}

// ErrClosed is returned by Subscribe once the server is shutting down.
var ErrClosed = errors.New("server is shutting down")

// Subscribe returns the caller's live identities: an SVID for every entry
// its selectors match and every ID it holds directly, and the bundle. A
// caller entitled to nothing still gets the bundle.
func (ids *identities) Subscribe(ctx context.Context, caller identity.Caller) (*Subscription, error) {
	return ids.subscribe(ctx, caller, nil)
}

// subscribe is Subscribe with extra entries beyond the caller's own, used
// by the server for its serving certificate.
func (ids *identities) subscribe(ctx context.Context, caller identity.Caller, extra []store.Entry) (*Subscription, error) {
	sub := &Subscription{ids: ids, caller: caller, extra: extra, ch: make(chan struct{}, 1)}
	ids.entMu.Lock()
	wanted := ids.entitlements(sub)
	ids.mu.Lock()
	if ids.closed {
		ids.mu.Unlock()
		ids.entMu.Unlock()
		return nil, ErrClosed
	}
	var missing []*slot
	for _, e := range wanted {
		sl := ids.acquire(e, sub)
		sub.entries = append(sub.entries, e.ID)
		if sl.svid == nil {
			missing = append(missing, sl)
		}
	}
	ids.subs[sub] = struct{}{}
	ids.mu.Unlock()
	ids.entMu.Unlock()

	// Mint outside the lock: signing must not stall other callers. One
	// identity that cannot be minted (an entry stored by an older version
	// with a SAN the CA refuses, a busy signer) must not take away the
	// caller's others or its bundle: it is retried on its own.
	for _, sl := range missing {
		if err := ids.ensure(ctx, sl); err != nil {
			if ctx.Err() != nil || slices.ContainsFunc(extra, func(e store.Entry) bool { return e.ID == sl.entry.ID }) {
				sub.Close()
				return nil, err
			}
			ids.mintFailed(sl, err)
		}
	}
	if err := ids.revokedCaller(caller); err != nil {
		sub.Close()
		return nil, err
	}
	ids.mu.Lock()
	sub.snap = ids.snapshotLocked(sub)
	err := sub.err
	ids.mu.Unlock()
	if err != nil {
		return nil, err // revoked while it was being set up
	}
	return sub, nil
}

// entitlements lists the entries a caller may hold, in default-first order:
// direct IDs (its certificate or token) first, then matched entries.
func (ids *identities) entitlements(sub *Subscription) []store.Entry {
	c := sub.caller
	out := slices.Clone(sub.extra)
	ids.mu.Lock()
	for _, id := range c.IDs {
		if !ids.banned[id.String()] {
			out = append(out, store.Entry{ID: directKey(id.String(), normSerial(c.Serial)), SpiffeID: id.String()})
		}
	}
	ids.mu.Unlock()
	for _, e := range ids.srv.entries.match(c.Selectors) {
		if !slices.ContainsFunc(out, func(o store.Entry) bool { return o.SpiffeID == e.SpiffeID && isDirect(o) }) {
			out = append(out, e)
		}
	}
	return out
}

func (ids *identities) acquire(e store.Entry, sub *Subscription) *slot {
	sl, ok := ids.slots[e.ID]
	if !ok {
		sl = &slot{entry: e, subs: map[*Subscription]struct{}{}}
		ids.slots[e.ID] = sl
	}
	if sl.refs == 0 && sl.svid != nil {
		// An idle slot: its SVID is reused until its renewal point, so a
		// caller that polls (REST SDS, FetchSecrets) does not get a new
		// key and certificate, and a new inventory row, on every call.
		if now := ids.srv.now(); now.Before(sl.renewAt) {
			ids.scheduleLocked(sl, sl.renewAt.Sub(now))
		} else {
			sl.svid = nil
		}
	}
	sl.refs++
	sl.subs[sub] = struct{}{}
	return sl
}

func (ids *identities) release(key string, sub *Subscription) {
	sl, ok := ids.slots[key]
	if !ok {
		return
	}
	// A slot replaced since (dropDirect, then a new holder) is not ours.
	if _, held := sl.subs[sub]; !held {
		return
	}
	delete(sl.subs, sub)
	sl.refs--
	if sl.refs > 0 {
		return
	}
	// Nobody holds it: stop renewing, but keep the SVID until its renewal
	// point for the next caller (sweepIdle drops it after that).
	if sl.stop != nil {
		sl.stop()
		sl.stop = nil
	}
}

// sweepIdle drops idle slots whose SVID has reached its renewal point.
func (ids *identities) sweepIdle(now time.Time) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	for k, sl := range ids.slots {
		if sl.refs == 0 && !now.Before(sl.renewAt) {
			delete(ids.slots, k)
		}
	}
}

// ensure mints the slot's first SVID if nobody has yet.
func (ids *identities) ensure(ctx context.Context, sl *slot) error {
	ids.mu.Lock()
	// A slot whose mint failed has its retry scheduled: a new holder waits
	// for it rather than adding a mint attempt of its own.
	have := sl.svid != nil || sl.retry > 0 && sl.stop != nil
	ids.mu.Unlock()
	if have {
		return nil
	}
	svid, err := ids.mint(ctx, sl.entry)
	if err != nil {
		return err
	}
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if sl.svid == nil && ids.slots[sl.entry.ID] == sl {
		ids.installLocked(sl, svid)
	}
	return nil
}

func (ids *identities) mint(ctx context.Context, e store.Entry) (*identity.SVID, error) {
	svid, err := ids.srv.MintX509SVID(ctx, MintRequest{
		SpiffeID:  e.SpiffeID,
		KeyType:   ca.KeyP256,
		TTL:       ids.ttlFor(e),
		ClampTTL:  true,
		DNSNames:  e.DNSNames,
		EntryID:   ids.entryIDForInventory(e),
		Requester: requesterFor(e),
	})
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: %w", e.SpiffeID, err)
	}
	ids.lin.note(svid.Serial, ids.entryIDForInventory(e), svid.NotAfter, ids.srv.now())
	return toIdentitySVID(svid, e)
}

// ttlFor is the entry's TTL, or 0 for the server default; mint clamps
// either to the CA's remaining life at the moment it signs.
func (ids *identities) ttlFor(e store.Entry) time.Duration {
	return e.TTL
}

// isDirect reports whether e stands for an ID the caller holds directly
// (certificate or token) rather than a registration entry.
func isDirect(e store.Entry) bool { return strings.HasPrefix(e.ID, "id:") }

// entryIDForInventory is the entry an SVID of slot e is issued under: the
// entry itself, or for a caller holding its ID through a certificate, the
// entry that certificate was issued under (none for join tokens).
func (ids *identities) entryIDForInventory(e store.Entry) string {
	if !isDirect(e) {
		return e.ID
	}
	if serial := directSerial(e.ID); serial != "" {
		entryID, _ := ids.lin.cached(serial)
		return entryID
	}
	return ""
}

// requesterFor is the inventory Requester of an SVID of slot e; for remote
// callers it names the credential, so that revoking that credential
// reaches its renewals (withDescendants).
func requesterFor(e store.Entry) string {
	switch {
	case !isDirect(e):
		return "workload"
	case directSerial(e.ID) != "":
		return requesterViaSVID(directSerial(e.ID))
	default:
		return requesterViaToken
	}
}

func toIdentitySVID(s *ca.X509SVID, e store.Entry) (*identity.SVID, error) {
	certs := make([]*x509.Certificate, 0, 1+len(s.ChainDER))
	for _, der := range append([][]byte{s.CertDER}, s.ChainDER...) {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("parse minted certificate: %w", err)
		}
		certs = append(certs, c)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(s.Key)
	if err != nil {
		return nil, fmt.Errorf("marshal svid key: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(s.Key)
	if err != nil {
		return nil, err
	}
	return &identity.SVID{
		ID:       s.ID,
		EntryID:  e.ID,
		Hint:     entryHint(e),
		Certs:    certs,
		ChainPEM: s.ChainPEM(),
		Key:      s.Key,
		KeyPEM:   keyPEM,
		KeyDER:   keyDER,
		Serial:   s.Serial,
		NotAfter: s.NotAfter,
	}, nil
}

// installLocked puts a new SVID in its slot, schedules its renewal and
// pushes it to every subscriber holding the slot.
func (ids *identities) installLocked(sl *slot, svid *identity.SVID) {
	sl.svid = svid
	sl.retry = 0
	// Half of the life from now, not from NotBefore: NotBefore is
	// back-dated for clock skew, which would make short-lived SVIDs renew
	// at once, forever.
	now := ids.srv.now()
	life := svid.NotAfter.Sub(now)
	jitter := 1 + renewJitter*(2*rand.Float64()-1)
	delay := time.Duration(float64(life) * renewFraction * jitter)
	sl.renewAt = now.Add(delay)
	ids.scheduleLocked(sl, delay)
	// Only the slot's own holders: a mass re-issue of N slots must not
	// walk all N subscriptions N times.
	for sub := range sl.subs {
		ids.notifySubLocked(sub)
	}
}

func (ids *identities) scheduleLocked(sl *slot, delay time.Duration) {
	if sl.stop != nil {
		sl.stop()
	}
	if ids.closed {
		return
	}
	sl.stop = ids.srv.afterFunc(max(delay, 0), func() { ids.renew(sl) })
}

// renew replaces a slot's SVID. On failure it retries with backoff; the
// old SVID stays in service, and the failure is counted so that alerts
// fire long before it expires.
func (ids *identities) renew(sl *slot) {
	ids.mu.Lock()
	if ids.closed || ids.slots[sl.entry.ID] != sl || sl.refs == 0 {
		ids.mu.Unlock()
		return
	}
	e := sl.entry
	ids.mu.Unlock()

	svid, err := ids.mint(context.Background(), e)

	ids.mu.Lock()
	defer ids.mu.Unlock()
	if ids.closed || ids.slots[sl.entry.ID] != sl {
		return
	}
	if err != nil && sl.svid == nil {
		ids.mintFailedLocked(sl, err)
		return
	}
	if err != nil {
		sl.retry = min(max(2*sl.retry, minRetry), maxRetry)
		ids.srv.metrics.RenewalFailures.Inc()
		ids.srv.metrics.MintFailures.WithLabelValues(mintFailureReason(err)).Inc()
		ids.srv.log.Error("svid renewal failed; retrying", "spiffe_id", e.SpiffeID, "retry_in", sl.retry, "expires", sl.svid.NotAfter, "err", err)
		ids.scheduleLocked(sl, sl.retry)
		return
	}
	ids.srv.log.Debug("svid renewed", "spiffe_id", e.SpiffeID, "serial", svid.Serial, "not_after", svid.NotAfter)
	ids.installLocked(sl, svid)
}

// notifyLocked rebuilds the snapshot of every subscriber match selects and
// signals it.
func (ids *identities) notifyLocked(match func(*Subscription) bool) {
	for s := range ids.subs {
		if match(s) {
			ids.notifySubLocked(s)
		}
	}
}

// notifySubLocked rebuilds one subscriber's snapshot and signals it.
func (ids *identities) notifySubLocked(s *Subscription) {
	if s.snap == nil {
		return // still being built by Subscribe, which takes the latest state
	}
	if _, live := ids.subs[s]; !live {
		return
	}
	s.snap = ids.snapshotLocked(s)
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

func (ids *identities) snapshotLocked(s *Subscription) *identity.Snapshot {
	snap := &identity.Snapshot{}
	for _, k := range s.entries {
		if sl := ids.slots[k]; sl != nil && sl.svid != nil {
			snap.SVIDs = append(snap.SVIDs, sl.svid)
		}
	}
	if ids.bundle != nil {
		snap.Bundles = []*identity.Bundle{ids.bundle}
	}
	if ids.jwtBundle != nil {
		snap.JWTBundles = []*identity.JWTBundle{ids.jwtBundle}
	}
	return snap
}

// setBundles publishes new trust bundles to every subscriber, if they
// changed.
func (ids *identities) setBundles(td spiffeid.TrustDomain, certs []*x509.Certificate, crls [][]byte, leafOnly bool, jb *identity.JWTBundle) {
	ders := make([][]byte, len(certs))
	for i, c := range certs {
		ders[i] = c.Raw
	}
	pemBytes := ca.EncodeCertsPEM(ders...)
	var crlPEM []byte
	for _, c := range crls {
		crlPEM = append(crlPEM, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: c})...)
	}
	h := sha256.New()
	h.Write(pemBytes)
	h.Write(crlPEM)
	if leafOnly {
		h.Write([]byte("leaf-only"))
	}
	b := &identity.Bundle{TrustDomain: td, X509Authorities: certs, PEM: pemBytes, CRLs: crls, CRLPEM: crlPEM, CRLLeafOnly: leafOnly, Version: hex.EncodeToString(h.Sum(nil)[:8])}
	ids.mu.Lock()
	defer ids.mu.Unlock()
	changed := false
	if ids.bundle == nil || ids.bundle.Version != b.Version {
		ids.bundle, changed = b, true
	}
	if jb != nil && (ids.jwtBundle == nil || ids.jwtBundle.Version != jb.Version) {
		ids.jwtBundle, changed = jb, true
	}
	if changed {
		ids.notifyLocked(func(*Subscription) bool { return true })
	}
}

// entriesChanged re-matches every subscriber after an entry was created or
// deleted: a new entry is served at once, a deleted one is withdrawn and
// no longer renewed.
func (ids *identities) entriesChanged(ctx context.Context) {
	ids.entMu.Lock()
	defer ids.entMu.Unlock()
	ids.mu.Lock()
	subs := make([]*Subscription, 0, len(ids.subs))
	for s := range ids.subs {
		subs = append(subs, s)
	}
	ids.mu.Unlock()
	for _, s := range subs {
		wanted := ids.entitlements(s)
		keys := make([]string, len(wanted))
		for i, e := range wanted {
			keys[i] = e.ID
		}
		ids.mu.Lock()
		if _, live := ids.subs[s]; !live || slices.Equal(keys, s.entries) {
			ids.mu.Unlock()
			continue
		}
		var missing []*slot
		for _, e := range wanted {
			if !slices.Contains(s.entries, e.ID) {
				if sl := ids.acquire(e, s); sl.svid == nil {
					missing = append(missing, sl)
				}
			}
		}
		for _, k := range s.entries {
			if !slices.Contains(keys, k) {
				ids.release(k, s)
			}
		}
		s.entries = keys
		ids.mu.Unlock()
		for _, sl := range missing {
			if err := ids.ensure(ctx, sl); err != nil {
				ids.mintFailed(sl, err)
			}
		}
		ids.mu.Lock()
		if _, live := ids.subs[s]; live {
			ids.notifyLocked(func(o *Subscription) bool { return o == s })
		}
		ids.mu.Unlock()
	}
}

// close stops every renewal timer; subscriptions see no further changes.
func (ids *identities) close() {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.closed = true
	for _, sl := range ids.slots {
		if sl.stop != nil {
			sl.stop()
		}
	}
}

// renewAll re-issues every served SVID now (after a CA activation with
// RotateSVIDsOnActivation). Each slot renews on its own timer goroutine,
// so the signing limits spread the burst.
func (ids *identities) renewAll() {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	for k, sl := range ids.slots {
		switch {
		case sl.refs == 0:
			delete(ids.slots, k) // idle: signed by the old CA; drop it
		case sl.svid != nil:
			ids.scheduleLocked(sl, 0)
		}
	}
}

// slotView is what a reissue filter sees of a slot.
type slotView struct {
	leaf    *x509.Certificate
	renewAt time.Time
}

// reissue re-issues the SVIDs match selects, the i-th served one after
// i x step so a fleet-wide re-issue queues inside the signing limits
// rather than failing against them (an emergency CA rotation). Idle slots
// selected are dropped: their next caller gets a fresh SVID. It returns how
// many served SVIDs were scheduled.
func (ids *identities) reissue(match func(*slotView) bool, step time.Duration) int {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	now := ids.srv.now()
	n := 0
	for k, sl := range ids.slots {
		if sl.svid == nil || len(sl.svid.Certs) == 0 || !match(&slotView{leaf: sl.svid.Certs[0], renewAt: sl.renewAt}) {
			continue
		}
		if sl.refs == 0 {
			delete(ids.slots, k)
			continue
		}
		d := time.Duration(n) * step
		sl.renewAt = now.Add(d)
		ids.scheduleLocked(sl, d)
		n++
	}
	return n
}

// servedBy counts the served SVIDs issuer signed.
func (ids *identities) servedBy(issuer *x509.Certificate) int {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	n := 0
	for _, sl := range ids.slots {
		if sl.refs > 0 && sl.svid != nil && len(sl.svid.Certs) > 0 && signedBy(sl.svid.Certs[0], issuer) {
			n++
		}
	}
	return n
}

// overdueGrace is how late a renewal may be before it counts as overdue: a
// retry in progress is not yet a problem.
const overdueGrace = time.Minute

// stats reports the soonest expiry among served SVIDs, how many are past
// their renewal point (plus grace), and how many are served.
func (ids *identities) stats(now time.Time) (earliest time.Time, overdue, served int) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	for _, sl := range ids.slots {
		if sl.svid == nil || sl.refs == 0 {
			continue
		}
		served++
		if earliest.IsZero() || sl.svid.NotAfter.Before(earliest) {
			earliest = sl.svid.NotAfter
		}
		if now.After(sl.renewAt.Add(overdueGrace)) {
			overdue++
		}
	}
	return earliest, overdue, served
}

// dropDirect withdraws the directly held identity id (certificate or token
// callers) from every subscriber: after a revocation it is not renewed.
func (ids *identities) dropDirect(id string) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	var keys []string
	for key, sl := range ids.slots {
		if key != "id:"+id && !strings.HasPrefix(key, "id:"+id+"#") {
			continue
		}
		if sl.stop != nil {
			sl.stop()
		}
		delete(ids.slots, key)
		keys = append(keys, key)
	}
	ids.notifyLocked(func(s *Subscription) bool {
		return slices.ContainsFunc(s.entries, func(k string) bool { return slices.Contains(keys, k) })
	})
}

// renewSerial re-issues the slot currently serving serial, at once: its
// certificate was revoked, the workload needs a fresh one.
func (ids *identities) renewSerial(serial string) bool {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	for k, sl := range ids.slots {
		if sl.svid != nil && sl.svid.Serial == serial {
			if sl.refs == 0 {
				delete(ids.slots, k) // idle: the next caller gets a fresh one
			} else {
				ids.scheduleLocked(sl, 0)
			}
			return true
		}
	}
	return false
}

func (ids *identities) ban(id string) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.banned[id] = true
}

func (ids *identities) unban(id string) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	delete(ids.banned, id)
}
