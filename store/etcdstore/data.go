package etcdstore

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshid/meshid/store"
)

// maxRetries bounds the read-modify-write loops; each conflict means
// another writer won, so only a key written in a tight loop by many
// replicas gets near it.
const maxRetries = 64

func marshal(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}

func unmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// roundTrip returns v as a read would return it.
func roundTrip[T any](v *T) (string, T, error) {
	var out T
	s, err := marshal(v)
	if err != nil {
		return "", out, err
	}
	err = unmarshal([]byte(s), &out)
	return s, out, err
}

func conflict(what string) error {
	return fmt.Errorf("%s: still conflicting after %d attempts: %w", what, maxRetries, store.ErrUnavailable)
}

// ---- CAs ----

// PutCA inserts or replaces a CA record with its audit event. It is fenced:
// a store holding the leadership writes only while its election key is
// still the one it won with; a store not holding it writes only while no
// replica campaigns at all (tools, a single replica before its first
// Campaign). Otherwise it fails with store.ErrNotLeader and writes nothing.
func (s *Store) PutCA(ctx context.Context, rec store.CARecord, audit *store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if rec.ID == "" {
		return fmt.Errorf("put ca: empty id: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&rec)
	if err != nil {
		return fmt.Errorf("put ca %s: %w", rec.ID, err)
	}
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(s.k.ca+rec.ID, val), s.marker()}, audit)
	if err != nil {
		return err
	}
	resp, err := s.txn(ctx, "put ca "+rec.ID, []clientv3.Cmp{s.fence()}, ops)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("put ca %s: %w", rec.ID, store.ErrNotLeader)
	}
	return nil
}

// ListCAs returns every CA record, oldest CreatedAt first (ties by ID).
func (s *Store) ListCAs(ctx context.Context) ([]store.CARecord, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list cas", s.k.ca, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out, err := decodeAll[store.CARecord](resp)
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(out, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

func decodeAll[T any](resp *clientv3.GetResponse) ([]T, error) {
	var out []T
	for _, kv := range resp.Kvs {
		var v T
		if err := unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("%s: %w", kv.Key, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// ---- entries ----

// uniqKey is boltstore's rule: (SpiffeID, selector set, ParentID) hashed
// with length prefixes, the parent only when set.
func (s *Store) uniqKey(e *store.Entry) string {
	var b []byte
	str := func(v string) { b = binary.AppendUvarint(b, uint64(len(v))); b = append(b, v...) }
	str(e.SpiffeID)
	b = binary.AppendUvarint(b, uint64(len(e.Selectors)))
	for _, sel := range e.Selectors {
		str(sel.Type)
		str(sel.Value)
	}
	if e.ParentID != "" {
		str(e.ParentID)
	}
	sum := sha256.Sum256(b)
	return s.k.uniq + hex.EncodeToString(sum[:])
}

// CreateEntry stores a new entry, its uniqueness claim and its audit event
// in one transaction that requires both keys to be absent.
func (s *Store) CreateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return fmt.Errorf("create entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&e)
	if err != nil {
		return fmt.Errorf("create entry %s: %w", e.ID, err)
	}
	ek, uk := s.k.entry+e.ID, s.uniqKey(&e)
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(ek, val), clientv3.OpPut(uk, e.ID), s.marker()}, &audit)
	if err != nil {
		return err
	}
	resp, err := s.txn(ctx, "create entry "+e.ID,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(ek), "=", 0), clientv3.Compare(clientv3.CreateRevision(uk), "=", 0)},
		ops, clientv3.OpGet(ek, clientv3.WithCountOnly()), clientv3.OpGet(uk))
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		if resp.Responses[0].GetResponseRange().Count > 0 {
			return fmt.Errorf("entry id %s: %w", e.ID, store.ErrAlreadyExists)
		}
		other := ""
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
			other = string(kvs[0].Value)
		}
		return fmt.Errorf("entry %s has the same spiffe id %s, selectors and parent: %w", other, e.SpiffeID, store.ErrAlreadyExists)
	}
	return nil
}

// getOne reads key: its value and ModRevision, or ok false.
func (s *Store) getOne(ctx context.Context, what, key string) (val []byte, rev int64, ok bool, err error) {
	return s.getOneWith(ctx, what, key, s.get)
}

// readOne is getOne for methods that only read (see read).
func (s *Store) readOne(ctx context.Context, what, key string) (val []byte, rev int64, ok bool, err error) {
	return s.getOneWith(ctx, what, key, s.read)
}

func (s *Store) getOneWith(ctx context.Context, what, key string, get func(context.Context, string, string, ...clientv3.OpOption) (*clientv3.GetResponse, error)) (val []byte, rev int64, ok bool, err error) {
	resp, err := get(ctx, what, key)
	if err != nil {
		return nil, 0, false, err
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, false, nil
	}
	return resp.Kvs[0].Value, resp.Kvs[0].ModRevision, true, nil
}

// unchangedCmp holds while key is still at rev (absent when rev is 0).
func unchangedCmp(key string, rev int64) clientv3.Cmp {
	if rev == 0 {
		return clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	}
	return clientv3.Compare(clientv3.ModRevision(key), "=", rev)
}

// dropClaim deletes uniqueness claim uk only if it is id's.
func dropClaim(uk, id string) clientv3.Op {
	return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value(uk), "=", id)}, []clientv3.Op{clientv3.OpDelete(uk)}, nil)
}

// DeleteEntry removes an entry and its claim with the audit event.
func (s *Store) DeleteEntry(ctx context.Context, id string, audit store.AuditEvent) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	what := "delete entry " + id
	ek := s.k.entry + id
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, ek)
		if err != nil {
			return store.Entry{}, err
		}
		if !ok {
			return store.Entry{}, fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
		}
		var e store.Entry
		if err := unmarshal(v, &e); err != nil {
			return store.Entry{}, fmt.Errorf("%s: %w", what, err)
		}
		ops, err := s.withAudit([]clientv3.Op{clientv3.OpDelete(ek), dropClaim(s.uniqKey(&e), id), s.marker()}, &audit)
		if err != nil {
			return store.Entry{}, err
		}
		resp, err := s.txn(ctx, what, []clientv3.Cmp{unchangedCmp(ek, rev)}, ops)
		if err != nil {
			return store.Entry{}, err
		}
		if resp.Succeeded {
			return e, nil
		}
	}
	return store.Entry{}, conflict(what)
}

// UpdateEntry replaces an entry, moving its uniqueness claim, with the
// audit event.
func (s *Store) UpdateEntry(ctx context.Context, e store.Entry, audit store.AuditEvent) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	if e.ID == "" || e.SpiffeID == "" {
		return store.Entry{}, fmt.Errorf("update entry: id and spiffe id are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&e)
	if err != nil {
		return store.Entry{}, fmt.Errorf("update entry %s: %w", e.ID, err)
	}
	what := "update entry " + e.ID
	ek, nk := s.k.entry+e.ID, s.uniqKey(&e)
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, ek)
		if err != nil {
			return store.Entry{}, err
		}
		if !ok {
			return store.Entry{}, fmt.Errorf("entry %s: %w", e.ID, store.ErrNotFound)
		}
		var old store.Entry
		if err := unmarshal(v, &old); err != nil {
			return store.Entry{}, fmt.Errorf("%s: %w", what, err)
		}
		cmps := []clientv3.Cmp{unchangedCmp(ek, rev)}
		ops := []clientv3.Op{clientv3.OpPut(ek, val), s.marker()}
		if oldK := s.uniqKey(&old); oldK != nk {
			// The new claim must be free (or, after a crash mid-way
			// elsewhere, already ours).
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(nk), "=", 0))
			ops = append(ops, dropClaim(oldK, e.ID), clientv3.OpPut(nk, e.ID))
		}
		if ops, err = s.withAudit(ops, &audit); err != nil {
			return store.Entry{}, err
		}
		resp, err := s.txn(ctx, what, cmps, ops, clientv3.OpGet(ek, clientv3.WithCountOnly()), clientv3.OpGet(nk))
		if err != nil {
			return store.Entry{}, err
		}
		if resp.Succeeded {
			return old, nil
		}
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 && string(kvs[0].Value) != e.ID {
			return store.Entry{}, fmt.Errorf("entry %s has the same spiffe id %s and selectors: %w", kvs[0].Value, e.SpiffeID, store.ErrAlreadyExists)
		}
	}
	return store.Entry{}, conflict(what)
}

// GetEntry returns one entry or store.ErrNotFound.
func (s *Store) GetEntry(ctx context.Context, id string) (store.Entry, error) {
	if err := s.check(ctx); err != nil {
		return store.Entry{}, err
	}
	v, _, ok, err := s.readOne(ctx, "get entry "+id, s.k.entry+id)
	if err != nil {
		return store.Entry{}, err
	}
	if !ok {
		return store.Entry{}, fmt.Errorf("entry %s: %w", id, store.ErrNotFound)
	}
	var e store.Entry
	if err := unmarshal(v, &e); err != nil {
		return store.Entry{}, fmt.Errorf("entry %s: %w", id, err)
	}
	return e, nil
}

// ListEntries pages through entries by ID. The page token is the last ID
// of the previous page.
func (s *Store) ListEntries(ctx context.Context, q store.EntryQuery) ([]store.Entry, string, error) {
	if err := s.check(ctx); err != nil {
		return nil, "", err
	}
	if q.PageSize < 0 {
		return nil, "", fmt.Errorf("list entries: negative page size: %w", store.ErrInvalid)
	}
	from := s.k.entry
	if q.PageToken != "" {
		from = s.k.entry + q.PageToken + "\x00"
	}
	opts := []clientv3.OpOption{clientv3.WithRange(clientv3.GetPrefixRangeEnd(s.k.entry))}
	if q.PageSize > 0 {
		opts = append(opts, clientv3.WithLimit(int64(q.PageSize)+1))
	}
	resp, err := s.read(ctx, "list entries", from, opts...)
	if err != nil {
		return nil, "", err
	}
	out, err := decodeAll[store.Entry](resp)
	if err != nil {
		return nil, "", err
	}
	next := ""
	if q.PageSize > 0 && len(out) > q.PageSize {
		out = out[:q.PageSize]
		next = out[len(out)-1].ID
	}
	return out, next, nil
}

// ---- tokens ----

// CreateToken stores a join token with its audit event.
func (s *Store) CreateToken(ctx context.Context, t store.JoinToken, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if t.Hash == "" || t.SpiffeID == "" || t.ExpiresAt.IsZero() {
		return fmt.Errorf("create token: hash, spiffe id and expiry are required: %w", store.ErrInvalid)
	}
	val, _, err := roundTrip(&t)
	if err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	tk := s.k.token + t.Hash
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(tk, val), s.marker()}, &audit)
	if err != nil {
		return err
	}
	resp, err := s.txn(ctx, "create token", []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(tk), "=", 0)}, ops)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("token: %w", store.ErrAlreadyExists)
	}
	return nil
}

// redeemable is the token as UseToken would redeem it, or ErrNotFound.
func redeemable(v []byte, ok bool, now time.Time, conn string) (store.JoinToken, error) {
	if !ok {
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	var t store.JoinToken
	if err := unmarshal(v, &t); err != nil {
		return t, fmt.Errorf("token: %w", err)
	}
	if !now.Before(t.ExpiresAt) || (t.SingleUse && (conn == "" || (!t.UsedAt.IsZero() && t.BoundTo != conn))) {
		// Expired and spent tokens look like unknown ones.
		return store.JoinToken{}, fmt.Errorf("token: %w", store.ErrNotFound)
	}
	return t, nil
}

// spend returns the token as redeemed and the op writing it (none when
// the redemption needs no write).
func spend(t store.JoinToken, key string, now time.Time, conn string) (store.JoinToken, []clientv3.Op, error) {
	if !t.SingleUse || !t.UsedAt.IsZero() {
		return t, nil, nil
	}
	t.UsedAt, t.BoundTo = now, conn
	val, out, err := roundTrip(&t)
	if err != nil {
		return store.JoinToken{}, nil, err
	}
	return out, []clientv3.Op{clientv3.OpPut(key, val)}, nil
}

// UseToken redeems a token; a single-use token's first use is a
// transaction on the token's ModRevision, so of two concurrent redemptions
// on any replicas one wins.
func (s *Store) UseToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, err
	}
	tk := s.k.token + hash
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, "use token", tk)
		if err != nil {
			return store.JoinToken{}, err
		}
		t, err := redeemable(v, ok, now, conn)
		if err != nil {
			return store.JoinToken{}, err
		}
		out, ops, err := spend(t, tk, now, conn)
		if err != nil || len(ops) == 0 {
			return out, err
		}
		resp, err := s.txn(ctx, "use token", []clientv3.Cmp{unchangedCmp(tk, rev)}, append(ops, s.marker()))
		if err != nil {
			return store.JoinToken{}, err
		}
		if resp.Succeeded {
			return out, nil
		}
	}
	return store.JoinToken{}, conflict("use token")
}

// PeekToken is UseToken without the write.
func (s *Store) PeekToken(ctx context.Context, hash string, now time.Time, conn string) (store.JoinToken, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, err
	}
	v, _, ok, err := s.getOne(ctx, "use token", s.k.token+hash)
	if err != nil {
		return store.JoinToken{}, err
	}
	return redeemable(v, ok, now, conn)
}

// deleteChunk is how many keys one deleting transaction removes: under
// etcd's default --max-txn-ops of 128 with room for the marker and audit.
const deleteChunk = 100

// deleteKeys deletes keys in transactions of deleteChunk (each with the
// watch marker) and returns how many existed.
func (s *Store) deleteKeys(ctx context.Context, what string, keys []string) (int, error) {
	n := 0
	for c := range slices.Chunk(keys, deleteChunk) {
		ops := make([]clientv3.Op, 0, len(c)+1)
		for _, k := range c {
			ops = append(ops, clientv3.OpDelete(k))
		}
		resp, err := s.txn(ctx, what, nil, append(ops, s.marker()))
		if err != nil {
			return n, err
		}
		for _, r := range resp.Responses[:len(c)] {
			n += int(r.GetResponseDeleteRange().Deleted)
		}
	}
	return n, nil
}

// DeleteTokensFor deletes every join token granting spiffeID.
func (s *Store) DeleteTokensFor(ctx context.Context, spiffeID string) (int, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	resp, err := s.get(ctx, "delete tokens", s.k.token, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	var doomed []string
	for _, kv := range resp.Kvs {
		var t store.JoinToken
		if err := unmarshal(kv.Value, &t); err != nil {
			return 0, fmt.Errorf("delete tokens: %s: %w", kv.Key, err)
		}
		if t.SpiffeID == spiffeID {
			doomed = append(doomed, string(kv.Key))
		}
	}
	return s.deleteKeys(ctx, "delete tokens", doomed)
}

// ---- revocations ----

// revokeChunk serials per transaction: each costs a compare and a put.
const revokeChunk = 120

// RevokeSerials adds serials to the revocation list with one audit event.
// Up to revokeChunk serials go in one transaction; a longer list is
// written in several, the audit event with the last.
func (s *Store) RevokeSerials(ctx context.Context, serials []store.RevokedSerial, audit store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	for _, r := range serials {
		if r.Serial == "" || len(r.Serial) > 128 || r.NotAfter.IsZero() {
			return fmt.Errorf("revoke: serial and expiry are required: %w", store.ErrInvalid)
		}
	}
	chunks := slices.Collect(slices.Chunk(serials, revokeChunk))
	if len(chunks) == 0 {
		chunks = [][]store.RevokedSerial{nil}
	}
	for i, c := range chunks {
		var au *store.AuditEvent
		if i == len(chunks)-1 {
			au = &audit
		}
		if err := s.revokeChunk(ctx, c, au); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) revokeChunk(ctx context.Context, serials []store.RevokedSerial, audit *store.AuditEvent) error {
	for range maxRetries {
		gets := make([]clientv3.Op, len(serials))
		for i, r := range serials {
			gets[i] = clientv3.OpGet(s.k.revoked+r.Serial, clientv3.WithCountOnly())
		}
		var exist []bool
		if len(gets) > 0 {
			resp, err := s.txn(ctx, "revoke serials", nil, gets)
			if err != nil {
				return err
			}
			for _, r := range resp.Responses {
				exist = append(exist, r.GetResponseRange().Count > 0)
			}
		}
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		seen := map[string]bool{}
		for i, r := range serials {
			if exist[i] || seen[r.Serial] {
				continue // the first record stays
			}
			seen[r.Serial] = true
			val, _, err := roundTrip(&r)
			if err != nil {
				return err
			}
			k := s.k.revoked + r.Serial
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
			ops = append(ops, clientv3.OpPut(k, val))
		}
		if len(ops) > 0 {
			ops = append(ops, s.marker())
		}
		ops, err := s.withAudit(ops, audit)
		if err != nil {
			return err
		}
		if len(ops) == 0 {
			return nil
		}
		resp, err := s.txn(ctx, "revoke serials", cmps, ops)
		if err != nil {
			return err
		}
		if resp.Succeeded {
			return nil
		}
	}
	return conflict("revoke serials")
}

// ListRevoked returns every revoked serial not yet pruned.
func (s *Store) ListRevoked(ctx context.Context) ([]store.RevokedSerial, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list revoked", s.k.revoked, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	return decodeAll[store.RevokedSerial](resp)
}

// PruneRevoked drops serials whose certificate expired before cutoff.
func (s *Store) PruneRevoked(ctx context.Context, cutoff time.Time) (int, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	resp, err := s.get(ctx, "prune revoked", s.k.revoked, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	var doomed []string
	for _, kv := range resp.Kvs {
		var r store.RevokedSerial
		if err := unmarshal(kv.Value, &r); err != nil {
			return 0, fmt.Errorf("prune revoked: %s: %w", kv.Key, err)
		}
		if r.NotAfter.Before(cutoff) {
			doomed = append(doomed, string(kv.Key))
		}
	}
	return s.deleteKeys(ctx, "prune revoked", doomed)
}

// NextCRLNumber returns max(floor, previous+1) for caID and persists it,
// a compare-and-swap on the counter's ModRevision.
func (s *Store) NextCRLNumber(ctx context.Context, caID string, floor int64) (int64, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	if caID == "" || floor < 0 {
		return 0, fmt.Errorf("next crl number: empty ca id or negative floor: %w", store.ErrInvalid)
	}
	what := "next crl number for " + caID
	key := s.k.crl + caID
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, what, key)
		if err != nil {
			return 0, err
		}
		n := floor
		if ok {
			prev, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: stored %q: %w", what, v, err)
			}
			if prev == 1<<63-1 {
				return 0, fmt.Errorf("crl number of %s is exhausted", caID)
			}
			n = max(floor, prev+1)
		}
		resp, err := s.txn(ctx, what, []clientv3.Cmp{unchangedCmp(key, rev)}, []clientv3.Op{clientv3.OpPut(key, strconv.FormatInt(n, 10))})
		if err != nil {
			return 0, err
		}
		if resp.Succeeded {
			return n, nil
		}
	}
	return 0, conflict(what)
}

// ---- agents ----

const maxAgentSVIDs = 16

func checkAgent(r *store.AgentRecord) error {
	if r.ID == "" {
		return fmt.Errorf("agent: an id is required: %w", store.ErrInvalid)
	}
	if len(r.NodeSVIDs) > maxAgentSVIDs {
		return fmt.Errorf("agent %s: %d node SVIDs, at most %d are kept: %w", r.ID, len(r.NodeSVIDs), maxAgentSVIDs, store.ErrInvalid)
	}
	for _, sv := range r.NodeSVIDs {
		if sv.Serial == "" || len(sv.Serial) > 128 {
			return fmt.Errorf("agent %s: node SVID serial %q: %w", r.ID, sv.Serial, store.ErrInvalid)
		}
	}
	return nil
}

// PutAgent inserts or replaces an agent record.
func (s *Store) PutAgent(ctx context.Context, rec store.AgentRecord, audit *store.AuditEvent) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if err := checkAgent(&rec); err != nil {
		return fmt.Errorf("put agent: %w", err)
	}
	val, _, err := roundTrip(&rec)
	if err != nil {
		return err
	}
	ops, err := s.withAudit([]clientv3.Op{clientv3.OpPut(s.k.agent+rec.ID, val), s.marker()}, audit)
	if err != nil {
		return err
	}
	_, err = s.txn(ctx, "put agent", nil, ops)
	return err
}

// agentEdit reads agent id and applies fn: the ops storing the result,
// the compare guarding the read, and the record as stored.
func (s *Store) agentEdit(ctx context.Context, id string, fn func(*store.AgentRecord, bool) error) (clientv3.Cmp, []clientv3.Op, store.AgentRecord, error) {
	ak := s.k.agent + id
	v, rev, exists, err := s.getOne(ctx, "update agent "+id, ak)
	if err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	rec := store.AgentRecord{ID: id}
	if exists {
		if err := unmarshal(v, &rec); err != nil {
			return clientv3.Cmp{}, nil, store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, err)
		}
	}
	if err := fn(&rec, exists); err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	if rec.ID != id {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, fmt.Errorf("update agent %s: the update changed the id to %q: %w", id, rec.ID, store.ErrInvalid)
	}
	if err := checkAgent(&rec); err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	val, out, err := roundTrip(&rec)
	if err != nil {
		return clientv3.Cmp{}, nil, store.AgentRecord{}, err
	}
	return unchangedCmp(ak, rev), []clientv3.Op{clientv3.OpPut(ak, val), s.marker()}, out, nil
}

// UpdateAgent changes a record in one transaction on its ModRevision,
// re-running fn on a conflict.
func (s *Store) UpdateAgent(ctx context.Context, id string, fn func(*store.AgentRecord, bool) error, audit *store.AuditEvent) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	if id == "" {
		return store.AgentRecord{}, fmt.Errorf("update agent: an id is required: %w", store.ErrInvalid)
	}
	for range maxRetries {
		cmp, ops, out, err := s.agentEdit(ctx, id, fn)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if ops, err = s.withAudit(ops, audit); err != nil {
			return store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "update agent "+id, []clientv3.Cmp{cmp}, ops)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return out, nil
		}
	}
	return store.AgentRecord{}, conflict("update agent " + id)
}

// AttestAgent spends a token and writes the agent record in one
// transaction guarded on both keys' revisions.
func (s *Store) AttestAgent(ctx context.Context, hash string, now time.Time, conn, id string, fn func(store.JoinToken, *store.AgentRecord, bool) error, audit *store.AuditEvent) (store.JoinToken, store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.JoinToken{}, store.AgentRecord{}, err
	}
	if id == "" {
		return store.JoinToken{}, store.AgentRecord{}, fmt.Errorf("attest agent: an id is required: %w", store.ErrInvalid)
	}
	tk := s.k.token + hash
	for range maxRetries {
		v, trev, ok, err := s.getOne(ctx, "attest agent", tk)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		t, err := redeemable(v, ok, now, conn)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		tok, tops, err := spend(t, tk, now, conn)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		acmp, ops, rec, err := s.agentEdit(ctx, id, func(r *store.AgentRecord, exists bool) error { return fn(tok, r, exists) })
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		if ops, err = s.withAudit(append(tops, ops...), audit); err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "attest agent "+id, []clientv3.Cmp{unchangedCmp(tk, trev), acmp}, ops)
		if err != nil {
			return store.JoinToken{}, store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return tok, rec, nil
		}
	}
	return store.JoinToken{}, store.AgentRecord{}, conflict("attest agent " + id)
}

// GetAgent returns one record or store.ErrNotFound.
func (s *Store) GetAgent(ctx context.Context, id string) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	v, _, ok, err := s.readOne(ctx, "get agent", s.k.agent+id)
	if err != nil {
		return store.AgentRecord{}, err
	}
	if !ok {
		return store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
	}
	var r store.AgentRecord
	if err := unmarshal(v, &r); err != nil {
		return r, fmt.Errorf("agent %s: %w", id, err)
	}
	return r, nil
}

// ListAgents returns every record ordered by ID.
func (s *Store) ListAgents(ctx context.Context) ([]store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return nil, err
	}
	resp, err := s.read(ctx, "list agents", s.k.agent, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	return decodeAll[store.AgentRecord](resp)
}

// DeleteAgent removes a record with the audit event.
func (s *Store) DeleteAgent(ctx context.Context, id string, audit store.AuditEvent) (store.AgentRecord, error) {
	if err := s.check(ctx); err != nil {
		return store.AgentRecord{}, err
	}
	ak := s.k.agent + id
	for range maxRetries {
		v, rev, ok, err := s.getOne(ctx, "delete agent", ak)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if !ok {
			return store.AgentRecord{}, fmt.Errorf("agent %s: %w", id, store.ErrNotFound)
		}
		var old store.AgentRecord
		if err := unmarshal(v, &old); err != nil {
			return old, fmt.Errorf("agent %s: %w", id, err)
		}
		ops, err := s.withAudit([]clientv3.Op{clientv3.OpDelete(ak), s.marker()}, &audit)
		if err != nil {
			return store.AgentRecord{}, err
		}
		resp, err := s.txn(ctx, "delete agent "+id, []clientv3.Cmp{unchangedCmp(ak, rev)}, ops)
		if err != nil {
			return store.AgentRecord{}, err
		}
		if resp.Succeeded {
			return old, nil
		}
	}
	return store.AgentRecord{}, conflict("delete agent " + id)
}
