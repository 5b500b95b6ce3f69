package boltstore

// Export and Import (store.Migrator) copy a whole store for `meshid store
// migrate`. Both go through this package's codecs, so what Import writes is
// byte for byte what the normal write path would have written for the same
// rows, and a store made by Import reads back exactly what was exported.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/meshid/meshid/store"
)

var _ store.Migrator = (*Store)(nil)

// Export reads the whole store in one bbolt read transaction: a consistent
// view, however many writes run meanwhile.
func (s *Store) Export(ctx context.Context) (store.Snapshot, error) {
	if err := ctx.Err(); err != nil {
		return store.Snapshot{}, err
	}
	var snap store.Snapshot
	err := s.view("export", func(tx *bolt.Tx) error {
		var err error
		if snap.CAs, err = exportBucket(ctx, tx.Bucket(bucketCAs), "ca", decodeCA); err != nil {
			return err
		}
		// ListCAs's order: oldest first, ties by ID (the key order).
		slices.SortStableFunc(snap.CAs, func(a, b store.CARecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
		if snap.Entries, err = exportBucket(ctx, tx.Bucket(bucketEntries), "entry", decodeEntry); err != nil {
			return err
		}
		// The expiry index holds the rows, in ListSVIDs's order.
		if snap.SVIDs, err = exportBucket(ctx, tx.Bucket(bucketSVIDExpiry), "svid", decodeSVID); err != nil {
			return err
		}
		// Sequence keys: oldest first.
		if snap.Audit, err = exportBucket(ctx, tx.Bucket(bucketAudit), "audit event", decodeAudit); err != nil {
			return err
		}
		if snap.Tokens, err = exportBucket(ctx, tx.Bucket(bucketTokens), "token", decodeToken); err != nil {
			return err
		}
		if snap.Revoked, err = exportBucket(ctx, tx.Bucket(bucketRevoked), "revoked serial", decodeRevoked); err != nil {
			return err
		}
		if b := tx.Bucket(bucketAgents); b != nil {
			if snap.Agents, err = exportBucket(ctx, b, "agent", decodeAgent); err != nil {
				return err
			}
		}
		snap.CRLNumbers, err = readCRLNumbers(tx.Bucket(bucketMeta))
		return err
	})
	if err != nil {
		return store.Snapshot{}, err
	}
	return snap, nil
}

// exportBucket decodes every value of b in key order.
func exportBucket[T any](ctx context.Context, b *bolt.Bucket, what string, decode func([]byte) (T, error)) ([]T, error) {
	var out []T
	if n := b.Stats().KeyN; n > 0 {
		out = make([]T, 0, n)
	}
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(out)%4096 == 4095 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		r, err := decode(v)
		if err != nil {
			return nil, fmt.Errorf("%s %x: %w", what, k, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func readCRLNumbers(meta *bolt.Bucket) (map[string]int64, error) {
	var out map[string]int64
	c := meta.Cursor()
	for k, v := c.Seek(crlNumberPrefix); k != nil && bytes.HasPrefix(k, crlNumberPrefix); k, v = c.Next() {
		if len(v) != 8 {
			return nil, fmt.Errorf("crl number %q: %w", k, errCorrupt)
		}
		if out == nil {
			out = map[string]int64{}
		}
		out[string(k[len(crlNumberPrefix):])] = int64(binary.BigEndian.Uint64(v))
	}
	return out, nil
}

// kv is one row as Import writes it.
type kv struct{ k, v []byte }

// imported is a snapshot encoded and checked, ready for Import's
// transaction.
type imported struct {
	cas, entries, uniq, svids, idx, audit, tokens, revoked, agents, crl []kv
}

// Import writes snap into this store, which must hold nothing, in one bbolt
// transaction: it all lands or none of it does. Rows are checked as the
// normal write path checks them (IDs present, serials within bounds, no two
// entries with the same SPIFFE ID, selectors and parent), and a snapshot
// that fails a check is refused with store.ErrInvalid. Audit events keep
// their times (a zero one stays zero) and their order; no event is added.
//
// Import counts as one commit of watched state: the revision advances by
// one and the watch log is reset to it, so a watch open across the Import
// ends with store.ErrCompacted (its consumer re-lists) and a watch from the
// new Revision sees the writes after it. A server opened on the file later
// starts from that revision like from any other.
func (s *Store) Import(ctx context.Context, snap store.Snapshot) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	rows, err := encodeSnapshot(&snap)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	fn := func(tx *bolt.Tx, _ *changes) error {
		if held := heldCounts(tx); !held.Empty() {
			return fmt.Errorf("the store already holds %s; import only into an empty store: %w", held, store.ErrAlreadyExists)
		}
		return writeSnapshot(tx, rows)
	}
	if err := s.Health(); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	r := &svidReq{op: "import", fn: fn, gated: true, resetWatch: true, done: make(chan error, 1)}
	if err := s.enqueue(r); err != nil {
		return fmt.Errorf("import: %w", err)
	}
	return <-r.done
}

// encodeSnapshot checks and encodes every row of snap outside the write
// transaction, which the committer shares with every other writer.
func encodeSnapshot(snap *store.Snapshot) (*imported, error) {
	var out imported
	seen := map[string]bool{}
	dup := func(kind, key string) bool {
		k := kind + "\x00" + key
		if seen[k] {
			return true
		}
		seen[k] = true
		return false
	}
	for i := range snap.CAs {
		c := &snap.CAs[i]
		if c.ID == "" || dup("ca", c.ID) {
			return nil, fmt.Errorf("CA record #%d: empty or repeated id %q: %w", i, c.ID, store.ErrInvalid)
		}
		out.cas = append(out.cas, kv{[]byte(c.ID), encodeCA(c)})
	}
	for i := range snap.Entries {
		e := &snap.Entries[i]
		if e.ID == "" || e.SpiffeID == "" || dup("entry", e.ID) {
			return nil, fmt.Errorf("entry #%d: empty or repeated id %q, or no spiffe id: %w", i, e.ID, store.ErrInvalid)
		}
		uk := uniqKey(e)
		if dup("uniq", string(uk)) {
			return nil, fmt.Errorf("entry %s: another entry has the same spiffe id %s, selectors and parent: %w", e.ID, e.SpiffeID, store.ErrInvalid)
		}
		out.entries = append(out.entries, kv{[]byte(e.ID), encodeEntry(e)})
		out.uniq = append(out.uniq, kv{uk, []byte(e.ID)})
	}
	for i := range snap.SVIDs {
		r := &snap.SVIDs[i]
		if r.Serial == "" || len(r.Serial) > maxSerialLen || dup("svid", r.Serial) {
			return nil, fmt.Errorf("inventory row #%d: serial %q empty, repeated or longer than %d: %w", i, r.Serial, maxSerialLen, store.ErrInvalid)
		}
		if r.NotAfter.IsZero() || !nanosInRange(r.NotAfter) {
			return nil, fmt.Errorf("inventory row %s: NotAfter %s out of range: %w", r.Serial, r.NotAfter, store.ErrInvalid)
		}
		key := expiryKey(r.NotAfter, r.Serial)
		out.svids = append(out.svids, kv{[]byte(r.Serial), key[:expiryPrefixLen]})
		out.idx = append(out.idx, kv{key, encodeSVID(r)})
	}
	for i := range snap.Audit {
		// Keys are the sequence numbers appendAudit would have given them.
		out.audit = append(out.audit, kv{binary.BigEndian.AppendUint64(nil, uint64(i+1)), encodeAudit(&snap.Audit[i])})
	}
	for i := range snap.Tokens {
		t := &snap.Tokens[i]
		if t.Hash == "" || t.SpiffeID == "" || t.ExpiresAt.IsZero() || dup("token", t.Hash) {
			return nil, fmt.Errorf("join token #%d: hash empty or repeated, or no spiffe id or expiry: %w", i, store.ErrInvalid)
		}
		out.tokens = append(out.tokens, kv{[]byte(t.Hash), encodeToken(t)})
	}
	for i := range snap.Revoked {
		r := &snap.Revoked[i]
		if r.Serial == "" || len(r.Serial) > maxSerialLen || r.NotAfter.IsZero() || dup("revoked", r.Serial) {
			return nil, fmt.Errorf("revoked serial #%d %q: empty, repeated, too long or without expiry: %w", i, r.Serial, store.ErrInvalid)
		}
		out.revoked = append(out.revoked, kv{[]byte(r.Serial), encodeRevoked(r)})
	}
	for i := range snap.Agents {
		a := &snap.Agents[i]
		if err := checkAgent(a); err != nil {
			return nil, err
		}
		if dup("agent", a.ID) {
			return nil, fmt.Errorf("agent %s: repeated: %w", a.ID, store.ErrInvalid)
		}
		out.agents = append(out.agents, kv{[]byte(a.ID), encodeAgent(a)})
	}
	for id, n := range snap.CRLNumbers {
		if id == "" || n < 0 {
			return nil, fmt.Errorf("CRL number %d of CA %q: %w", n, id, store.ErrInvalid)
		}
		key := append(append([]byte(nil), crlNumberPrefix...), id...)
		out.crl = append(out.crl, kv{key, binary.BigEndian.AppendUint64(nil, uint64(n))})
	}
	return &out, nil
}

// heldCounts is what tx's store holds, per kind.
func heldCounts(tx *bolt.Tx) store.SnapshotCounts {
	n := func(name []byte) int {
		b := tx.Bucket(name)
		if b == nil {
			return 0
		}
		return b.Stats().KeyN
	}
	c := store.SnapshotCounts{
		CAs: n(bucketCAs), Entries: n(bucketEntries), SVIDs: n(bucketSVIDs), Audit: n(bucketAudit),
		Tokens: n(bucketTokens), Revoked: n(bucketRevoked), Agents: n(bucketAgents),
	}
	// The uniqueness index and the expiry index hold nothing without the
	// entries and serials, but a file where they do is not empty either.
	c.Entries = max(c.Entries, n(bucketEntryUniq))
	c.SVIDs = max(c.SVIDs, n(bucketSVIDExpiry))
	mc := tx.Bucket(bucketMeta).Cursor()
	for k, _ := mc.Seek(crlNumberPrefix); k != nil && bytes.HasPrefix(k, crlNumberPrefix); k, _ = mc.Next() {
		c.CRLNumbers++
	}
	return c
}

// writeSnapshot puts rows into tx's (empty) buckets.
func writeSnapshot(tx *bolt.Tx, rows *imported) error {
	put := func(name []byte, rows []kv) error {
		if len(rows) == 0 {
			return nil
		}
		b, err := tx.CreateBucketIfNotExists(name) // agents: made by the first write
		if err != nil {
			return err
		}
		for _, r := range rows {
			if err := b.Put(r.k, r.v); err != nil {
				return fmt.Errorf("bucket %s: %w", name, err)
			}
		}
		return nil
	}
	for _, p := range []struct {
		name []byte
		rows []kv
	}{
		{bucketCAs, rows.cas}, {bucketEntries, rows.entries}, {bucketEntryUniq, rows.uniq},
		{bucketSVIDs, rows.svids}, {bucketSVIDExpiry, rows.idx}, {bucketAudit, rows.audit},
		{bucketTokens, rows.tokens}, {bucketRevoked, rows.revoked}, {bucketAgents, rows.agents},
		{bucketMeta, rows.crl},
	} {
		if err := put(p.name, p.rows); err != nil {
			return err
		}
	}
	// Later AppendAudit calls continue after the imported events.
	return tx.Bucket(bucketAudit).SetSequence(uint64(len(rows.audit)))
}

// reset empties the watch log and moves it to rev, the revision of an
// Import: the imported state is not a stream of changes a watcher could
// apply, so every open watch ends with store.ErrCompacted (its consumer
// lists again) and new ones start from rev.
func (h *hub) reset(rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.log)
	h.log = h.log[:0]
	h.nevents = 0
	h.rev, h.compacted = rev, rev
	close(h.wake)
	h.wake = make(chan struct{})
}
