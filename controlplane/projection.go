package controlplane

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshid/meshid/revocation"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/svidcache"
)

// The server's memory is a projection of the store. The entry index, the
// CA views, the JWT keys and the revocation list change only when the
// store's watch reports a commit, never in the RPC that wrote it; that is
// what lets several replicas share one store (each sees the others'
// writes) and what keeps one replica's memory from drifting from what is
// durable. A write returns once the projection has reached the store's
// revision after it (synced), so its caller reads its own write.
//
// Only the watch goroutine (and Open, before it starts) applies changes.
// Applying never waits for a write of its own to be applied: the one
// watched write it makes, the leader's CRL set (crlset.go), it only makes.

// projection tracks how far the watch has been applied.
type projection struct {
	mu      sync.Mutex
	applied int64
	// changed is closed, and replaced, whenever applied advances.
	changed chan struct{}
}

func (p *projection) init(rev int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.applied = rev
	p.changed = make(chan struct{})
}

func (p *projection) advance(rev int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rev <= p.applied {
		return
	}
	p.applied = rev
	close(p.changed)
	p.changed = make(chan struct{})
}

// waitApplied returns once the projection has applied rev.
func (s *Server) waitApplied(ctx context.Context, rev int64) error {
	for {
		s.proj.mu.Lock()
		applied, ch := s.proj.applied, s.proj.changed
		s.proj.mu.Unlock()
		if applied >= rev {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for the write to be applied: %w", ctx.Err())
		case <-s.tasks.ctx.Done():
			return fmt.Errorf("wait for the write to be applied: %w", ErrClosed)
		}
	}
}

// synced returns once every write that returned before it was called is
// in the server's memory (and so pushed to subscribers).
func (s *Server) synced(ctx context.Context) error {
	rev, err := s.store.Revision(ctx)
	if err != nil {
		return fmt.Errorf("read store revision: %w", err)
	}
	return s.waitApplied(ctx, rev)
}

// load builds the whole projection from a listing of the store. It runs in
// Open, and again when the watch was compacted past what was applied.
func (s *Server) load(ctx context.Context, initial bool) error {
	if _, err := s.refreshCAs(ctx, initial); err != nil {
		return err
	}
	list, err := s.store.ListRevoked(ctx)
	if err != nil {
		return fmt.Errorf("load revoked serials: %w", err)
	}
	s.mu.Lock()
	s.revoked = revocation.New(list)
	s.mu.Unlock()
	if err := s.loadStoredCRLs(ctx); err != nil {
		return err
	}
	entries, _, err := s.store.ListEntries(ctx, store.EntryQuery{})
	if err != nil {
		return fmt.Errorf("load entries: %w", err)
	}
	if initial {
		// Nothing indexed yet, nothing subscribed: no differences to find.
		for _, e := range entries {
			s.entries.put(e)
			s.byParent.add(e)
		}
		s.entryGen.Add(1)
	} else {
		s.replaceEntries(entries)
	}
	if err := s.loadAgents(ctx); err != nil {
		return err
	}
	s.log.Debug("loaded state from the store", "entries", len(entries), "revoked", len(list))
	return nil
}

// replaceEntries makes the index hold exactly list.
func (s *Server) replaceEntries(list []store.Entry) {
	keep := make(map[string]bool, len(list))
	for _, e := range list {
		keep[e.ID] = true
		s.applyEntry(store.Event{Kind: store.KindEntry, Op: store.OpPut, Key: e.ID, Entry: &e})
	}
	for _, id := range s.entries.ids() {
		if !keep[id] {
			e, _ := s.entries.get(id)
			s.applyEntry(store.Event{Kind: store.KindEntry, Op: store.OpDelete, Key: id, Entry: &e})
		}
	}
}

// watch applies the store's changes from rev on until ctx ends: the one
// writer of the projection.
func (s *Server) watch(ctx context.Context, rev int64) {
	for {
		w, err := s.store.Watch(ctx, rev)
		if err == nil {
			for resp := range w.Responses() {
				s.apply(ctx, resp)
				rev = resp.Revision
				s.proj.advance(rev)
			}
			err = w.Err()
		}
		if ctx.Err() != nil || errors.Is(err, store.ErrClosed) {
			return
		}
		if errors.Is(err, store.ErrCompacted) {
			// Fell behind what the store retains: list everything again.
			s.log.Warn("store watch compacted: reloading state", "from_revision", rev)
			next, rerr := s.store.Revision(ctx)
			if rerr == nil {
				rerr = s.load(ctx, false)
			}
			if rerr == nil {
				s.afterChange(ctx, changeSet{cas: true, revoked: true, entries: true})
				rev = next
				s.proj.advance(rev)
				continue
			}
			err = rerr
		}
		s.log.Error("store watch failed; retrying", "from_revision", rev, "err", err)
		if !s.tasks.sleep(ctx, time.Second) {
			return
		}
	}
}

// changeSet says what a commit changed, for what follows from it.
type changeSet struct {
	cas, revoked, entries bool
	crls                  bool // the leader stored a new CRL set
	activeChanged         bool
	newRevoked            []store.RevokedSerial
}

// apply applies one commit's events to the projection.
func (s *Server) apply(ctx context.Context, resp store.WatchResponse) {
	var cs changeSet
	for _, ev := range resp.Events {
		switch ev.Kind {
		case store.KindEntry:
			cs.entries = true
			s.applyEntry(ev)
		case store.KindCA:
			cs.cas = true
		case store.KindRevoked:
			if s.applyRevoked(ev) && ev.Op == store.OpPut {
				cs.newRevoked = append(cs.newRevoked, *ev.Revoked)
			}
			cs.revoked = true
		case store.KindToken:
			s.applyToken(ev)
		case store.KindAgent:
			s.applyAgent(ev)
		case store.KindCRLs:
			cs.crls = true
		}
	}
	if cs.crls {
		if err := s.loadStoredCRLs(ctx); err != nil {
			s.log.Error("apply the leader's CRL set", "revision", resp.Revision, "err", err)
		}
	}
	if cs.cas {
		changed, err := s.refreshCAs(ctx, false)
		if err != nil {
			s.log.Error("apply CA change", "revision", resp.Revision, "err", err)
		}
		cs.activeChanged = changed
	}
	s.afterChange(ctx, cs)
}

// afterChange does what follows from a change: bundles re-published (with
// re-signed CRLs), the lifecycle re-planned, callers re-matched, streams
// authenticated by a newly revoked certificate ended and SVIDs that were
// revoked replaced.
func (s *Server) afterChange(ctx context.Context, cs changeSet) {
	if cs.cas || cs.revoked || cs.crls {
		if err := s.publishBundles(); err != nil {
			s.log.Error("publish bundles", "err", err)
		}
	}
	if cs.cas || cs.revoked {
		s.scheduleRotation()
	}
	if cs.activeChanged && s.cfg.RotateSVIDsOnActivation {
		s.ids.RenewAll()
	}
	if len(cs.newRevoked) > 0 {
		s.endRevokedStreams(cs.newRevoked)
		for _, r := range cs.newRevoked {
			s.ids.RenewSerial(r.Serial)
		}
	}
	if cs.entries {
		s.agents.wake()
		s.ids.EntriesChanged(ctx)
	}
}

func (s *Server) applyEntry(ev store.Event) {
	switch ev.Op {
	case store.OpPut:
		old, ok := s.entries.get(ev.Key)
		if ok && reflect.DeepEqual(old, *ev.Entry) {
			return // a replay of what was listed
		}
		if ok {
			s.entries.remove(ev.Key)
			s.byParent.remove(old)
		}
		s.entries.put(*ev.Entry)
		s.byParent.add(*ev.Entry)
		s.entryGen.Add(1)
		if ok {
			s.ids.EntryUpdated(cacheEntry(*ev.Entry))
		}
	case store.OpDelete:
		old, ok := s.entries.get(ev.Key)
		if !ok {
			return
		}
		s.entries.remove(ev.Key)
		s.byParent.remove(old)
		s.entryGen.Add(1)
		// Its JWT-SVIDs issued until now are refused (jwtrevoke.go), on
		// every replica.
		s.revokeJWTs(ev.Entry.SpiffeID, s.now())
	}
}

// applyRevoked reports whether the event changed the list.
func (s *Server) applyRevoked(ev store.Event) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	var changed bool
	if ev.Op == store.OpPut {
		s.revoked, changed = s.revoked.Put(*ev.Revoked)
	} else {
		s.revoked, changed = s.revoked.Delete(*ev.Revoked)
	}
	return changed
}

// applyToken follows join tokens: a new one is the administrator's word
// that its identity may be served to remote callers again; a deleted one
// (tokens are deleted only by revoking their identity) ends what was
// served on the strength of it.
func (s *Server) applyToken(ev store.Event) {
	t := ev.Token
	switch {
	case ev.Op == store.OpPut && t.UsedAt.IsZero():
		s.match.unban(t.SpiffeID)
	case ev.Op == store.OpDelete:
		// As Revoke does on the replica it ran on: the identity is not
		// served again to callers holding it directly until a new token
		// is made, and what they hold now ends.
		s.match.ban(t.SpiffeID)
		s.endDirect(t.SpiffeID)
		s.ids.Drop(func(key string) bool { return svidcache.DirectKeyOf(key, t.SpiffeID) })
	}
}

// refreshCAs rebuilds the CA views and JWT keys from the store, keeping
// what memory knows beyond the records (loaded keys, the last NotAfter
// signed, dependents) for CAs it already holds. It reports whether the
// signing CA changed. initial is Open's first load: failures are fatal
// there and later only logged.
func (s *Server) refreshCAs(ctx context.Context, initial bool) (bool, error) {
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		return false, fmt.Errorf("load CAs: %w", err)
	}
	now := s.now()
	s.mu.RLock()
	oldCAs, oldActiveID, oldJWTID := s.cas, s.activeID, s.jwtID
	oldJWT := s.jwt
	s.mu.RUnlock()
	old := make(map[string]*caView, len(oldCAs))
	for _, v := range oldCAs {
		old[v.rec.ID] = v
	}
	var (
		views    []*caView
		retiring []*caView
		jwtKeys  []jwtKeyView
		errs     []error
	)
	for _, rec := range recs {
		if rec.Kind == "jwt" {
			pub, err := x509.ParsePKIXPublicKey(rec.PublicKey)
			if err != nil {
				errs = append(errs, fmt.Errorf("JWT key %s: %w", rec.ID, err))
				continue
			}
			jwtKeys = append(jwtKeys, jwtKeyView{rec: rec, pub: pub})
			continue
		}
		if rec.Kind != "x509" {
			continue
		}
		if o := old[rec.ID]; o != nil {
			if o.rec.State == rec.State && o.rec.NotAfter.Equal(rec.NotAfter) {
				views = append(views, o)
				continue
			}
			nv := &caView{rec: rec, cert: o.cert, root: o.root, auth: o.auth, stateAt: now,
				lastNotAfter: o.lastNotAfter, dependents: o.dependents}
			switch rec.State {
			case store.CARetired:
				retiring = append(retiring, nv)
			case store.CATainted:
				// Counted before the view is published: a zero count
				// would drop it from the bundle before its SVIDs are
				// re-issued.
				nv.dependents.Store(int64(s.servedBy(nv.cert)))
			}
			views = append(views, nv)
			continue
		}
		v, err := s.newCAView(rec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !initial {
			v.stateAt = now
		}
		if initial && rec.State == store.CATainted {
			// Nothing is served yet after a restart: keep it published
			// until the first recount, when reconnected callers have
			// their SVIDs from the new CA.
			v.dependents.Store(1)
		}
		views = append(views, v)
	}
	if initial && len(errs) > 0 {
		return false, errors.Join(errs...)
	}
	slices.SortStableFunc(views, func(a, b *caView) int { return a.rec.CreatedAt.Compare(b.rec.CreatedAt) })
	// A CA that stopped signing stays published until the last SVID it
	// signed expires: what this replica signed is in lastNotAfter, what
	// others signed is in the inventory.
	if initial {
		// An active or prepared CA's value is read when it retires (the
		// reload above): asking for it here would only add its rows.
		for _, v := range views {
			if v.rec.State != store.CAActive && v.rec.State != store.CAPrepared {
				retiring = append(retiring, v)
			}
		}
	}
	if err := s.loadLastNotAfter(ctx, retiring); err != nil {
		errs = append(errs, err)
	}
	// Activation writes the new CA as active before retiring the old one,
	// so between the two (or after a crash there) two are active: the
	// newer one signs.
	var active *caView
	for _, v := range views {
		if v.rec.State == store.CAActive && v.auth != nil && (active == nil || !v.rec.CreatedAt.Before(active.rec.CreatedAt)) {
			active = v
		}
	}
	var activeJWT *jwtKeyView
	for i := range jwtKeys {
		if k := &jwtKeys[i]; k.rec.State == store.CAActive && (activeJWT == nil || !k.rec.CreatedAt.Before(activeJWT.rec.CreatedAt)) {
			activeJWT = k
		}
	}
	jwtAuth, jwtID := oldJWT, oldJWTID
	if activeJWT != nil && activeJWT.rec.ID != oldJWTID {
		j, err := s.unsealJWT(s.kek, activeJWT.rec)
		if err != nil {
			errs = append(errs, err)
		} else {
			jwtAuth, jwtID = j, activeJWT.rec.ID
		}
	}
	if initial && (active == nil || jwtAuth == nil) {
		return false, errors.Join(append(errs, errors.New("the store holds no active CA and JWT key"))...)
	}
	s.mu.Lock()
	s.cas = views
	if active != nil {
		s.active, s.activeID = active.auth, active.rec.ID
	}
	s.jwt, s.jwtID, s.jwtKeys = jwtAuth, jwtID, jwtKeys
	s.mu.Unlock()
	changed := active != nil && active.rec.ID != oldActiveID && oldActiveID != ""
	if changed {
		s.log.Info("signing CA changed", "active", active.rec.ID, "previous", oldActiveID)
	}
	return changed, errors.Join(errs...)
}

// newCAView parses and unseals a CA record. Retired CAs keep their key in
// memory too: they still sign the CRLs of the certificates they issued.
func (s *Server) newCAView(rec store.CARecord) (*caView, error) {
	cert, err := x509.ParseCertificate(rec.CertDER)
	if err != nil {
		return nil, fmt.Errorf("CA %s: parse certificate: %w", rec.ID, err)
	}
	v := &caView{rec: rec, cert: cert, root: cert, lastNotAfter: new(atomic.Int64), dependents: new(atomic.Int64)}
	if n := len(rec.ChainDER); n > 0 {
		if v.root, err = x509.ParseCertificate(rec.ChainDER[n-1]); err != nil {
			return nil, fmt.Errorf("CA %s: parse chain: %w", rec.ID, err)
		}
	}
	if v.auth, err = s.unsealAuthority(s.kek, rec); err != nil {
		return nil, err
	}
	return v, nil
}
