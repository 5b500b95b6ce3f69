// Package store persists meshid's state behind one interface: CA keys and
// certificates, registration entries, the inventory of issued SVIDs and the
// audit trail. The interface carries no backend types so that bbolt (the
// embedded default) and etcd (HA) can both sit behind it.
package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/meshid/meshid/entry"
)

// Errors returned by every Store implementation. Callers match them with
// errors.Is to pick a gRPC code.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	// ErrLocked means another process holds the store (a second server on
	// the same data dir).
	ErrLocked = errors.New("store is locked by another process")
	// ErrSchema means the file was written by an incompatible version.
	ErrSchema = errors.New("unsupported store schema version")
	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("store is closed")
	// ErrInvalid means the caller passed something the store cannot hold
	// (an empty ID, a malformed page token); it maps to InvalidArgument.
	ErrInvalid = errors.New("invalid argument")
	// ErrUnavailable means the store cannot make writes durable right now
	// (a failed write or fsync, e.g. a full disk): the write must be treated
	// as not done, and a certificate whose row it was is not handed out.
	// (After an fsync error the row may still show up later, the harmless
	// direction.) It maps to gRPC Unavailable; reads still work.
	ErrUnavailable = errors.New("store cannot make writes durable")
	// ErrCompacted means a watch asked for, or fell behind to, a revision
	// whose events the store no longer retains. The consumer re-lists the
	// state and watches again from the revision it listed at.
	ErrCompacted = errors.New("watch revision compacted")
	// ErrNotLeader is returned by a write only the leader may make (a CA
	// or JWT key record) when the caller's store no longer holds the
	// leadership: a replica whose lease expired must not race the new
	// leader. It maps to FailedPrecondition.
	ErrNotLeader = errors.New("this replica does not hold the store's leadership")
)

// CAState is where a CA is in its life: prepared (published in the bundle,
// not yet signing), active (signing), retired (published until the last SVID
// it signed has expired).
type CAState string

// CA states.
const (
	CAPrepared CAState = "prepared"
	CAActive   CAState = "active"
	CARetired  CAState = "retired"
	// CATainted is a CA retired by an emergency rotation: published only
	// while an SVID the server serves still depends on it.
	CATainted CAState = "tainted"
	// CARevoked is a CA withdrawn from the bundle for good; the record
	// stays for the audit trail.
	CARevoked CAState = "revoked"
)

// CARecord is one CA as persisted. The private key is sealed by the caller
// (see package kek) before it reaches the store: the store never sees a
// plaintext key.
type CARecord struct {
	ID        string // stable identifier, e.g. hex of the certificate's SHA-256
	Kind      string // "x509" or "jwt"
	State     CAState
	CertDER   []byte   // the CA certificate (x509 kind)
	ChainDER  [][]byte // intermediates above CertDER up to, excluding, the root
	PublicKey []byte   // PKIX public key (jwt kind)
	SealedKey []byte   // private key, encrypted at rest
	NotBefore time.Time
	NotAfter  time.Time
	CreatedAt time.Time
}

// Entry and Selector are declared in package entry, which the CLI and the
// node agent share without importing the store; these aliases are kept so
// that backends and the Store API read naturally (store.Entry).
type (
	// Entry is a registration entry (see entry.Entry).
	Entry = entry.Entry
	// Selector is one attestable property of a caller (see entry.Selector).
	Selector = entry.Selector
)

// IssuedSVID is one row of the inventory of issued certificates.
type IssuedSVID struct {
	Serial    string // lowercase hex, no separators
	SpiffeID  string
	NotBefore time.Time
	NotAfter  time.Time
	EntryID   string // empty for admin mints without an entry
	Requester string // who asked: "admin uid:0", "unix:uid:1000", ...
	CAID      string
	IssuedAt  time.Time
}

// AuditEvent records one admin action.
type AuditEvent struct {
	Time   time.Time
	Actor  string
	Action string // e.g. "entry.create"
	Target string // e.g. the entry ID
	Detail string
}

// JoinToken lets a remote caller (a proxy on another host) authenticate to
// the workload APIs over TCP before it holds an SVID. Only the SHA-256 of
// the secret is stored.
type JoinToken struct {
	Hash      string // lowercase hex SHA-256 of the secret
	SpiffeID  string // the identity the token grants
	ExpiresAt time.Time
	// SingleUse tokens are consumed by their first use.
	SingleUse bool
	UsedAt    time.Time // zero until first used
	// BoundTo is, for a single-use token, the connection that used it
	// (an opaque ID the caller gives): that connection alone may present
	// it again (Envoy sends the token on each of its streams). Empty
	// until used.
	BoundTo   string
	CreatedAt time.Time
}

// RevokedSerial is a certificate put on its CA's CRL before it expired. It
// leaves the CRL once NotAfter has passed: an expired certificate is
// refused anyway, so CRLs stay small.
type RevokedSerial struct {
	Serial    string // lowercase hex, as in the inventory
	CAID      string
	SpiffeID  string
	NotAfter  time.Time
	RevokedAt time.Time
}

// SVIDQuery selects inventory rows, ordered by NotAfter then Serial.
type SVIDQuery struct {
	// NotExpiredAt, if set, skips rows with NotAfter <= NotExpiredAt.
	NotExpiredAt time.Time
	// ExpiringBefore, if set, skips rows with NotAfter > ExpiringBefore.
	ExpiringBefore time.Time
	// PageSize caps the rows returned; 0 means no cap.
	PageSize int
	// PageToken resumes after the last row of a previous page.
	PageToken string
}

// EntryQuery pages through entries ordered by ID.
type EntryQuery struct {
	PageSize  int
	PageToken string
}

// Store is meshid's persistence. All methods are safe for concurrent use.
// A method that returns an error has changed nothing.
type Store interface {
	// PutCA inserts or replaces a CA record (by ID).
	PutCA(ctx context.Context, rec CARecord, audit *AuditEvent) error
	// PutCAs inserts or replaces several CA records and records the audit
	// events in one transaction: all or nothing. An activation is two
	// records (the successor active, the old CA retired); written apart, a
	// crash or a leader change between them left two active CAs.
	PutCAs(ctx context.Context, recs []CARecord, audits []AuditEvent) error
	// ListCAs returns every CA record, oldest CreatedAt first.
	ListCAs(ctx context.Context) ([]CARecord, error)

	// CreateEntry stores a new entry and its audit event atomically. It
	// returns ErrAlreadyExists if the ID exists or another entry has the same
	// SpiffeID, the same selector set and the same ParentID.
	CreateEntry(ctx context.Context, e Entry, audit AuditEvent) error
	// DeleteEntry removes an entry and records the audit event atomically;
	// ErrNotFound if there is no such entry.
	DeleteEntry(ctx context.Context, id string, audit AuditEvent) (Entry, error)
	// UpdateEntry replaces the entry with e.ID and records the audit event
	// atomically, returning the entry as it was: ErrNotFound if there is
	// none, ErrAlreadyExists if another entry has e's SpiffeID, selector
	// set and ParentID.
	UpdateEntry(ctx context.Context, e Entry, audit AuditEvent) (Entry, error)
	// GetEntry returns one entry or ErrNotFound.
	GetEntry(ctx context.Context, id string) (Entry, error)
	// ListEntries pages through entries by ID; next is "" on the last page.
	ListEntries(ctx context.Context, q EntryQuery) (entries []Entry, next string, err error)

	// RecordSVID durably records an issued SVID: when it returns nil the row
	// survives a crash; when it returns an error the caller must not hand
	// the certificate out. Concurrent callers are committed together (group
	// commit), so throughput grows with the number of callers.
	RecordSVID(ctx context.Context, s IssuedSVID) error
	// ListSVIDs pages through the inventory ordered by NotAfter.
	ListSVIDs(ctx context.Context, q SVIDQuery) (rows []IssuedSVID, next string, err error)
	// PruneSVIDs deletes rows whose NotAfter is before cutoff and returns how
	// many it deleted.
	PruneSVIDs(ctx context.Context, cutoff time.Time) (int, error)
	// LastSVIDNotAfter returns, for each of caIDs with inventory rows, the
	// latest NotAfter among its rows rounded up to a whole second (exact
	// for certificate times, which are whole seconds); a CA without rows
	// is absent. A CA whose rows were all pruned by a cutoff less than a
	// second after that latest NotAfter may still be reported. It does not
	// decode the inventory: a starting server asks it how long each
	// retired CA must stay in the bundle, and reading 100k rows for that
	// cost most of the start-up.
	LastSVIDNotAfter(ctx context.Context, caIDs []string) (map[string]time.Time, error)

	// AppendAudit records an admin action that has no store change of its own
	// (e.g. an admin mint).
	AppendAudit(ctx context.Context, ev AuditEvent) error
	// ListAudit returns the newest events first, at most limit (0: all).
	ListAudit(ctx context.Context, limit int) ([]AuditEvent, error)

	// CreateToken stores a join token and its audit event atomically;
	// ErrAlreadyExists if the hash exists.
	CreateToken(ctx context.Context, t JoinToken, audit AuditEvent) error
	// UseToken redeems a token on connection conn: ErrNotFound if there
	// is no such token, it has expired at now, or it is single-use and was
	// used on another connection (or conn is empty). A single-use token's
	// first use marks it used and binds it to conn in the same
	// transaction, so two concurrent redemptions cannot both succeed;
	// later uses on conn succeed without a write. The binding is in the
	// store, so it holds across restarts and replicas.
	UseToken(ctx context.Context, hash string, now time.Time, conn string) (JoinToken, error)
	// PeekToken is UseToken without the write: the token UseToken would
	// redeem for hash, now and conn, or ErrNotFound; nothing changes. It
	// is for a caller that must do work before it spends the token in
	// another write (AttestAgent).
	PeekToken(ctx context.Context, hash string, now time.Time, conn string) (JoinToken, error)
	// DeleteTokensFor deletes every join token granting spiffeID (after a
	// revocation of that identity) and returns how many.
	DeleteTokensFor(ctx context.Context, spiffeID string) (int, error)

	// RevokeSerials adds serials to the revocation list with one audit
	// event, atomically. A serial already revoked keeps its first record.
	RevokeSerials(ctx context.Context, serials []RevokedSerial, audit AuditEvent) error
	// ListRevoked returns every revoked serial not yet pruned.
	ListRevoked(ctx context.Context) ([]RevokedSerial, error)
	// PruneRevoked drops revoked serials whose certificate expired before
	// cutoff and returns how many it dropped.
	PruneRevoked(ctx context.Context, cutoff time.Time) (int, error)

	// NextCRLNumber returns the next CRL number for caID and persists it:
	// max(floor, previous+1), so numbers never go backwards for a CA across
	// restarts or replicas (RFC 5280 5.2.3 wants them increasing per
	// issuer). A floor such as the current time in milliseconds keeps
	// numbers meaningful after the counter is lost with a wiped store.
	NextCRLNumber(ctx context.Context, caID string, floor int64) (int64, error)
	// PutCRLs replaces the signed CRL set every replica serves (see
	// SignedCRLs), watched as KindCRLs. Like PutCAs it is a leader's write:
	// a backend shared by replicas refuses it with ErrNotLeader from a
	// store that does not hold the leadership while another does.
	PutCRLs(ctx context.Context, c SignedCRLs) error
	// GetCRLs returns the signed CRL set, or ErrNotFound if none was put.
	GetCRLs(ctx context.Context) (SignedCRLs, error)

	// Revision returns the store's current revision: every commit that
	// changes watched state (entries, CAs and JWT keys, revoked serials,
	// join tokens) gets a higher revision than the one before. Writes of
	// unwatched state (inventory, audit, CRL counters) may or may not
	// advance it. A caller that wants to read its own write through a
	// watch-fed projection waits until the projection has reached the
	// Revision read after its write returned.
	Revision(ctx context.Context) (int64, error)
	// Watch replays the retained changes with a revision above fromRev,
	// then streams live ones in commit order, one WatchResponse per commit.
	// It fails with an error wrapping ErrCompacted if changes after
	// fromRev are no longer retained, and the watch ends with that error if
	// its consumer falls so far behind that the changes it has not yet
	// received are dropped: writers never wait for watchers. A consumer
	// starts with fromRev = Revision() read before it lists, so that
	// nothing committed between list and watch is missed (a replayed
	// change it already listed sets a key to what it already holds). The
	// watch ends when ctx is cancelled or the store closes.
	Watch(ctx context.Context, fromRev int64) (Watcher, error)
	// Campaign blocks until the caller leads (or ctx ends) and returns the
	// leadership. At most one Leadership over a store is held at a time,
	// across every process using it; a backend with a single process
	// (boltstore) grants it at once unless another caller in the process
	// holds it. Work only the leader may do (CA lifecycle transitions) runs
	// while Done is open.
	Campaign(ctx context.Context) (Leadership, error)

	// Health is nil while the store can make writes durable; otherwise an
	// error wrapping ErrUnavailable says why (writes adding state are then
	// refused with it). Readiness reports it.
	Health() error

	// AgentStore keeps the node agents' records.
	AgentStore

	// Close releases the store; it waits for pending RecordSVID commits.
	Close() error
}

// Kind names the kind of state a watch Event is about.
type Kind string

// Watched kinds.
const (
	KindEntry   Kind = "entry"   // Key is Entry.ID
	KindCA      Kind = "ca"      // Key is CARecord.ID; X.509 CAs and JWT keys
	KindRevoked Kind = "revoked" // Key is RevokedSerial.Serial
	KindToken   Kind = "token"   // Key is JoinToken.Hash
)

// KindCRLs is the watched kind of the signed CRL set; Key is empty. Its
// event carries the set without DER and Covers (which may be hundreds of
// kilobytes, and a watch log retains thousands of events): the consumer
// reads the set with GetCRLs.
const KindCRLs Kind = "crls"

// SignedCRLs is one set of CRLs, one per CA a peer may meet in a chain,
// signed by the leader and served by every replica while it lists what
// the replica's own view would: replicas that each signed their own would
// serve different bytes for the same revocations, and so a different
// trust-bundle version, and every agent that fails over would be pushed a
// bundle that differs only in CRL signatures.
type SignedCRLs struct {
	// Covers says what the CRLs list: the CAs and their revoked serials,
	// as the server spells them. A replica compares it with its own.
	Covers    string
	Number    int64 // the CRL number every CRL of the set carries
	SignedAt  time.Time
	RefreshAt time.Time // when the leader re-signs the set
	DER       [][]byte
}

// Validate reports whether c can be stored (it wraps ErrInvalid).
func (c SignedCRLs) Validate() error {
	if len(c.DER) == 0 || c.Number <= 0 || c.RefreshAt.IsZero() {
		return fmt.Errorf("signed crls: no CRL, a non-positive number or no refresh time: %w", ErrInvalid)
	}
	for i, d := range c.DER {
		if len(d) == 0 {
			return fmt.Errorf("signed crls: CRL %d is empty: %w", i, ErrInvalid)
		}
	}
	return nil
}

// KindAgent is the watched kind of node agent records; Key is
// AgentRecord.ID. It is watched so that a ban or an eviction on one
// replica ends the agent's streams on every other.
const KindAgent Kind = "agent"

// Op is what happened to a key.
type Op string

// Operations.
const (
	OpPut    Op = "put"    // created or replaced; the value is the new one
	OpDelete Op = "delete" // removed; the value is the last one it had
)

// Event is one key's change in a commit. Exactly one of Entry, CA, Revoked,
// Token, Agent and CRLs is set, the one Kind names.
type Event struct {
	Kind     Kind
	Op       Op
	Key      string
	Revision int64

	Entry   *Entry
	CA      *CARecord
	Revoked *RevokedSerial
	Token   *JoinToken
	Agent   *AgentRecord
	CRLs    *SignedCRLs
}

// WatchResponse is one commit's changes, in the order the commit made them.
// A response with no Events is a progress notification: nothing watched
// changed up to Revision (a backend whose revision also advances on
// unwatched writes sends them so that a consumer waiting for a Revision is
// woken; boltstore never sends them).
type WatchResponse struct {
	Revision int64
	Events   []Event
}

// Watcher is a running Watch. Responses are delivered in revision order and
// never repeated; they may be shared with other watchers, so a consumer
// treats them (and the values their events point at) as read-only. The channel is closed when the watch ends; Err then says
// why: nil after the watch's ctx was cancelled, an error wrapping
// ErrCompacted when the consumer fell behind, ErrClosed when the store
// closed. A consumer that cancels the watch's ctx and needs its goroutine
// gone (goleak) drains the channel until it is closed.
type Watcher interface {
	Responses() <-chan WatchResponse
	Err() error
}

// Leadership is held from a successful Campaign until Resign, until the
// store is closed, or until the backend loses it (an expired etcd lease);
// Done is closed then. The campaign's ctx only bounds the wait.
type Leadership interface {
	Done() <-chan struct{}
	// Resign gives the leadership up so that another campaigner can take
	// it; it is idempotent.
	Resign(ctx context.Context) error
}

// AgentRecord is a node agent the server attested (meshid agent list).
type AgentRecord struct {
	ID        string // the agent's SPIFFE ID
	Method    string // how it attested, e.g. "join_token"
	Node      string // the node name within the method
	FirstSeen time.Time
	LastSeen  time.Time
	// NodeSVIDs are the node SVIDs issued since the agent last attested
	// that may still be live, oldest first; the server accepts only these
	// from the agent, so an eviction followed by a new attestation leaves
	// the older ones useless.
	NodeSVIDs []AgentSVID
	Banned    bool
	BannedAt  time.Time // zero unless Banned
	// Selectors describe the node as its attestation established it
	// ("k8s_psat:node-name:web-1"); none for a join token.
	Selectors []string
}

// AgentSVID is one node SVID in an AgentRecord.
type AgentSVID struct {
	Serial   string // lowercase hex, as in the inventory
	NotAfter time.Time
}

// SVIDExpiry is when the agent's newest node SVID expires (zero if none).
func (r AgentRecord) SVIDExpiry() time.Time {
	if len(r.NodeSVIDs) == 0 {
		return time.Time{}
	}
	return r.NodeSVIDs[len(r.NodeSVIDs)-1].NotAfter
}

// AgentStore is the part of Store that keeps node agent records. Every
// write is watched (KindAgent).
type AgentStore interface {
	// PutAgent inserts or replaces the record with rec.ID, with audit if
	// it is not nil; ErrInvalid without an ID.
	PutAgent(ctx context.Context, rec AgentRecord, audit *AuditEvent) error
	// UpdateAgent changes the record with id in one transaction: fn gets
	// the stored record (exists true) or a zero one with only ID set
	// (exists false) and edits it in place; what it leaves is stored, with
	// audit if not nil. An error from fn (return ErrNotFound to refuse
	// creating a record) is returned and nothing changes. fn may run more
	// than once (a backend retrying a conflict) and must not have other
	// effects. It returns the record as stored.
	UpdateAgent(ctx context.Context, id string, fn func(rec *AgentRecord, exists bool) error, audit *AuditEvent) (AgentRecord, error)
	// AttestAgent spends a join token and writes the agent record it
	// attests in one transaction: the token is redeemed as UseToken
	// redeems it (ErrNotFound where UseToken would refuse it), then fn
	// gets the token as redeemed and the record id as UpdateAgent's fn
	// gets it, and what fn leaves is stored, with audit if not nil.
	// Either both change or neither: a refused token leaves the record
	// alone, an error from fn (or an invalid record) leaves the token as
	// it was. fn may run more than once and must not have other effects.
	// It returns the token and the record as stored.
	AttestAgent(ctx context.Context, hash string, now time.Time, conn, id string, fn func(t JoinToken, rec *AgentRecord, exists bool) error, audit *AuditEvent) (JoinToken, AgentRecord, error)
	// GetAgent returns one record or ErrNotFound.
	GetAgent(ctx context.Context, id string) (AgentRecord, error)
	// ListAgents returns every record ordered by ID.
	ListAgents(ctx context.Context) ([]AgentRecord, error)
	// DeleteAgent removes a record and records the audit event atomically,
	// returning the record as it was; ErrNotFound if there is none.
	DeleteAgent(ctx context.Context, id string, audit AuditEvent) (AgentRecord, error)
}

// Snapshot is the whole persistent state of a store, as Export reads it and
// Import writes it: what `meshid store migrate` copies between backends.
// Rows are in each List method's order.
type Snapshot struct {
	CAs     []CARecord
	Entries []Entry
	SVIDs   []IssuedSVID
	Audit   []AuditEvent // oldest first
	Tokens  []JoinToken  // by Hash
	Revoked []RevokedSerial
	Agents  []AgentRecord
	// CRLNumbers is the last CRL number handed out per CA ID.
	CRLNumbers map[string]int64
}

// Migrator is implemented by backends that can be copied to another:
// Export reads everything in one consistent view; Import writes a snapshot
// verbatim (no audit events of its own) into a store that holds nothing,
// and refuses (ErrAlreadyExists) one that holds anything. A failed Import
// may leave part of the snapshot written; the migration tool then says so
// and the target is wiped before a retry.
type Migrator interface {
	Export(ctx context.Context) (Snapshot, error)
	Import(ctx context.Context, snap Snapshot) error
}

// ClusterStatus is what `meshid status` shows of the store: for etcd the
// members, the replicas sharing it and which one leads.
type ClusterStatus struct {
	Backend  string // "bolt" or "etcd"
	Revision int64
	// Leader is the ReplicaID of the replica holding the leadership
	// ("" when none does).
	Leader string
	// Self is the ReplicaID of the store answering.
	Self     string
	Replicas []Replica
	Members  []Member // etcd members; none for bolt
}

// Replica is one server process sharing the store.
type Replica struct {
	ID        string // Options.Replica of its store: host name unless set
	Version   string
	StartedAt time.Time
	// Addresses the replica serves agents and admins on, as it announced
	// them (informational).
	Addresses []string
	// Convergence is opaque to the store: what the replica tells its
	// peers about the bundle its connected agents hold (the leader gates
	// CA activation on every replica's agents, not only its own).
	Convergence []byte
}

// Member is one etcd member as the client sees it.
type Member struct {
	Name     string
	Endpoint string
	Healthy  bool
	Leader   bool   // the etcd Raft leader
	Error    string // why it is unhealthy
	Revision int64
	DBSize   int64
}

// Clustered is implemented by backends shared by several replicas
// (etcdstore): Announce registers this replica for as long as the store is
// open (a lease-bound key: a replica that dies leaves the list within the
// lease), and called again replaces what it announced; Cluster reads the
// whole picture. Announce fills Replica.ID from the store's own replica
// name when it is empty.
type Clustered interface {
	Announce(ctx context.Context, r Replica) error
	Cluster(ctx context.Context) (ClusterStatus, error)
	// Replicas is the replicas part of Cluster alone, and the answering
	// replica's ID: one read, for callers that poll it (Cluster also asks
	// every etcd member for its status).
	Replicas(ctx context.Context) (self string, replicas []Replica, err error)
}
