package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/ca"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/store"
)

// Node agents (`meshid agent`) prove which node they are with a join
// token made for them (`meshid token create --agent`), get a node SVID
// spiffe://<td>/meshid/agent/join/<node>, and from then on talk mTLS with
// it: one Sync stream on which the server pushes the entries the node may
// serve and the bundle, and batches of CSRs for keys the agent made.

// agentPath is the path prefix of node agents' SPIFFE IDs, inside the
// reserved prefix no entry or workload token may grant.
const agentPath = reservedPath + "agent/"

// Attestation methods: the join token is built in; k8s_psat is checked by
// a NodeAttestor (kube/psat) when the server runs on Kubernetes.
const (
	methodJoinToken = "join_token"
	methodK8sPSAT   = "k8s_psat"
)

// MaxSignBatch bounds the CSRs of one SignX509SVIDs call: a node with more
// entries sends several.
const MaxSignBatch = 1000

// batchParallelism is how many items of one batch are in the mint path at
// once: all of them. An item holds its slot until its inventory row is
// committed, so with fewer slots (64 until issue 10's last round) the
// CPU idled through every group commit's fsync while the next items
// waited for a slot, and the batch's rows were spread over many small
// commits; with every item in flight they share a few, which cost about
// a quarter less CPU per SVID and half the system time
// (BenchmarkAgentBatchSign). The agent's signing bucket (allowSign: a
// burst of 2×MaxSignBatch, then signRate) bounds what one agent can have
// in flight.
const batchParallelism = MaxSignBatch

var nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// methodSegments names each attestation method in agent IDs.
var methodSegments = map[string]string{methodJoinToken: "join", methodK8sPSAT: methodK8sPSAT}

// AgentID is the SPIFFE ID of the agent on node, attested by method:
// spiffe://<td>/meshid/agent/<method>/<node>.
func (s *Server) AgentID(method, node string) (spiffeid.ID, error) {
	seg, ok := methodSegments[method]
	if !ok {
		return spiffeid.ID{}, fmt.Errorf("unknown attestation method %q", method)
	}
	return spiffeid.FromSegments(s.td, "meshid", "agent", seg, node)
}

// isAgentID reports whether id names a node agent of this trust domain.
func (s *Server) isAgentID(id spiffeid.ID) bool {
	return id.TrustDomain() == s.td && strings.HasPrefix(id.Path(), agentPath)
}

// CreateAgentToken makes a single-use join token with which the agent on
// node attests once; it then renews its node SVID itself. An empty node
// gets a random name.
func (s *Server) CreateAgentToken(ctx context.Context, node string, ttl time.Duration, actor string) (string, store.JoinToken, error) {
	if node == "" {
		var b [6]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", store.JoinToken{}, err
		}
		node = "node-" + hex.EncodeToString(b[:])
	}
	if !nodeIDPattern.MatchString(node) {
		return "", store.JoinToken{}, invalidf("node id %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", node)
	}
	id, err := s.AgentID(methodJoinToken, node)
	if err != nil {
		return "", store.JoinToken{}, invalidf("node id %q: %v", node, err)
	}
	return s.createToken(ctx, agentTokenPrefix, id.String(), ttl, true, actor)
}

// attestJoinToken is the join-token attestation: it checks the agent
// token secret, signs a node SVID for csr's key and spends the token and
// records the agent in one store transaction (store.AttestAgent), and
// returns the agent ID and the node SVID chain, to be handed out only
// once it returns without error.
//
// The token is spent after the signature, where it used to be spent
// first: the record must name the node SVID, and the token's use and the
// record in one commit (one fsync) are what lets a thousand agents attest
// at once without queueing on the store's writer twice each. The cost is
// that two attestations racing with one token can both get a node SVID
// signed; only the one whose transaction spends the token is recorded and
// handed out, the other's is refused at once (admitAgent admits only the
// serials in the record) and expires unused.
func (s *Server) attestJoinToken(ctx context.Context, secret string, csr []byte) (spiffeid.ID, [][]byte, error) {
	if !strings.HasPrefix(secret, agentTokenPrefix) {
		return spiffeid.ID{}, nil, ErrBadToken
	}
	// Bound to a fresh nonce: an agent token attests exactly once.
	var nonce [16]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return spiffeid.ID{}, nil, err
	}
	hash, conn := hashToken(secret), "attest "+hex.EncodeToString(nonce[:])
	t, err := s.store.PeekToken(ctx, hash, s.now(), conn)
	if errors.Is(err, store.ErrNotFound) {
		return spiffeid.ID{}, nil, ErrBadToken
	}
	if err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("redeem token: %w", err)
	}
	id, err := spiffeid.FromString(t.SpiffeID)
	if err != nil || !s.isAgentID(id) {
		return spiffeid.ID{}, nil, ErrBadToken
	}
	if err := s.refuseBanned(id); err != nil {
		return spiffeid.ID{}, nil, err
	}
	chain, err := s.signNodeSVID(ctx, id, csr, "agent attestation "+methodJoinToken)
	if err != nil {
		return spiffeid.ID{}, nil, err
	}
	n, err := nodeSVID(chain)
	if err != nil {
		return spiffeid.ID{}, nil, err
	}
	now := s.now()
	_, _, err = s.store.AttestAgent(ctx, hash, now, conn, id.String(), func(tok store.JoinToken, r *store.AgentRecord, exists bool) error {
		if tok.SpiffeID != id.String() {
			return ErrBadToken // cannot happen: the hash names one token
		}
		return attestedRecord(r, exists, methodJoinToken, attest.NodeClaim{Node: path.Base(id.Path())}, n, now)
	}, &store.AuditEvent{Time: now, Actor: id.String(), Action: "agent.attest", Target: id.String(), Detail: "method " + methodJoinToken + ", node SVID " + n.Serial})
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, ErrBadToken):
		// Spent (or expired) since the look-up: this node SVID is never
		// handed out.
		return spiffeid.ID{}, nil, ErrBadToken
	case errors.Is(err, errAgentBanned):
		return spiffeid.ID{}, nil, bannedStatus(id.String())
	case err != nil:
		return spiffeid.ID{}, nil, fmt.Errorf("record agent %s: %w", id, err)
	}
	// The agent's next call may come at once: it must be admitted.
	if err := s.synced(ctx); err != nil {
		return spiffeid.ID{}, nil, err
	}
	return id, chain, nil
}

// agentHub wakes every Sync stream when what agents may see changes.
type agentHub struct {
	mu      sync.Mutex
	streams map[*agentStream]struct{}
	// versions are the CAs in each bundle version sent; gateHeld is set
	// while the lifecycle holds an activation for convergence
	// (convergence.go).
	versions bundleCAs
	gateHeld atomic.Bool
	// recs are the agents' records as the store's watch last said
	// (agents.go): an agent without one, or banned, is refused.
	recs map[string]store.AgentRecord
	// byAgent are the agents with a Sync stream open here, by ID: how
	// many and their last report (agentreport.go).
	byAgent map[string]*agentSessions
}

type agentStream struct {
	id     spiffeid.ID
	notify chan struct{} // buffered 1: changes coalesce
	kill   chan error    // buffered 1: why the stream must end now (ban, evict)
	serial string        // of the node SVID it authenticated with; guarded by agentHub.mu
}

// maxSyncPerAgent bounds one agent's open Sync streams: it needs one (two
// while it reconnects); each holds a goroutine and what it sent.
const maxSyncPerAgent = 4

// add registers st, or refuses it when its agent holds maxSyncPerAgent
// streams already.
func (h *agentHub) add(st *agentStream) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.streams == nil {
		h.streams = map[*agentStream]struct{}{}
		h.byAgent = map[string]*agentSessions{}
	}
	id := st.id.String()
	sess := h.byAgent[id]
	if sess == nil {
		sess = &agentSessions{}
		h.byAgent[id] = sess
	}
	if sess.n >= maxSyncPerAgent {
		return status.Errorf(codes.ResourceExhausted, "agent %s holds %d Sync streams already; it needs one", st.id, sess.n)
	}
	sess.n++
	h.streams[st] = struct{}{}
	return nil
}

// remove unregisters st; with its agent's last stream on this server its
// report goes too (a session's counts vanish when its stream ends).
func (h *agentHub) remove(st *agentStream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.streams[st]; !ok {
		return
	}
	delete(h.streams, st)
	id := st.id.String()
	if sess := h.byAgent[id]; sess != nil {
		if sess.n--; sess.n <= 0 {
			delete(h.byAgent, id)
		}
	}
}

// wake tells every stream to compare what it sent with what is now.
func (h *agentHub) wake() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for st := range h.streams {
		select {
		case st.notify <- struct{}{}:
		default:
		}
	}
}

// wakeNode tells the streams of the agents attested by method on node to
// compare what they sent with what is now.
func (h *agentHub) wakeNode(method, node string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for st := range h.streams {
		if r, ok := h.recs[st.id.String()]; ok && r.Method == method && r.Node == node {
			select {
			case st.notify <- struct{}{}:
			default:
			}
		}
	}
}

// connected is how many Sync streams are open.
func (h *agentHub) connected() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.streams)
}

// AgentService is the agent API over gRPC.
type AgentService struct {
	agentv1.UnimplementedAgentServiceServer
	srv  *Server
	done chan struct{}
	once sync.Once
}

// NewAgentService returns the agent API of s.
func NewAgentService(s *Server) *AgentService {
	return &AgentService{srv: s, done: make(chan struct{})}
}

// Shutdown ends every Sync stream (Unavailable: the agent reconnects), so
// a draining gRPC server does not wait on them.
func (a *AgentService) Shutdown() { a.once.Do(func() { close(a.done) }) }

// agentCaller is the agent a call comes from: the node SVID it presented
// (verified against the bundle in the handshake), not revoked since.
func (a *AgentService) agentCaller(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "no peer")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "present the node SVID as TLS client certificate (attest first)")
	}
	leaf := info.State.PeerCertificates[0]
	if err := a.srv.admitAgentSynced(ctx, leaf); err != nil {
		return spiffeid.ID{}, err
	}
	if a.srv.isRevoked(leaf) {
		return spiffeid.ID{}, status.Errorf(codes.PermissionDenied, "node SVID %x is revoked", leaf.SerialNumber)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || !a.srv.isAgentID(id) {
		return spiffeid.ID{}, status.Error(codes.PermissionDenied, "the client certificate is not a node agent's SVID")
	}
	return id, nil
}

// Attest implements agentv1.AgentServiceServer.
func (a *AgentService) Attest(ctx context.Context, req *agentv1.AttestRequest) (*agentv1.AttestResponse, error) {
	method := req.GetMethod()
	na, plugged := a.srv.nodeAttestor(method)
	if method != methodJoinToken && !plugged {
		return nil, status.Errorf(codes.InvalidArgument, "attestation method %q is not offered; this server takes %s", method, a.srv.attestMethods())
	}
	if err := a.srv.agentLim.allowAttest(); err != nil {
		return nil, err
	}
	// Cheap checks before the CSR's signature is: a secret that is not an
	// agent token fails here.
	if method == methodJoinToken && !strings.HasPrefix(string(req.GetPayload()), agentTokenPrefix) {
		return nil, status.Error(codes.PermissionDenied, "agent join token is unknown, expired, already used or not made for an agent")
	}
	// The CSR before the proof: a malformed one must not spend the token.
	if _, err := ca.ParseCSR(req.GetCsr()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	var (
		id    spiffeid.ID
		chain [][]byte
		claim attest.NodeClaim
		err   error
	)
	if !plugged {
		id, chain, err = a.srv.attestJoinToken(ctx, string(req.GetPayload()), req.GetCsr())
		if errors.Is(err, ErrBadToken) {
			return nil, status.Error(codes.PermissionDenied, "agent join token is unknown, expired, already used or not made for an agent")
		}
		if err != nil {
			return nil, a.srv.agentStatus("attest", err)
		}
		a.srv.log.Info("agent attested", "agent", id.String(), "method", methodJoinToken)
		return &agentv1.AttestResponse{SvidChain: chain, SpiffeId: id.String(), AgentId: id.String(), Bundle: a.srv.agentBundle()}, nil
	}
	claim, err = na.Attest(ctx, req.GetPayload())
	if errors.Is(err, attest.ErrNodeRefused) {
		a.srv.log.Warn("agent attestation refused", "method", method, "why", err)
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
	if err != nil {
		a.srv.log.Error("agent attestation could not be checked", "method", method, "err", err)
		return nil, status.Errorf(codes.Unavailable, "%s attestation could not be checked: %v", method, err)
	}
	if id, err = a.srv.agentIDFor(method, claim); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if err := a.srv.refuseBanned(id); err != nil {
		return nil, err
	}
	chain, err = a.srv.signNodeSVID(ctx, id, req.GetCsr(), "agent attestation "+method)
	if err != nil {
		return nil, a.srv.agentStatus("attest", err)
	}
	if err := a.srv.recordAttested(ctx, id, method, claim, chain); err != nil {
		return nil, a.srv.agentStatus("attest", err)
	}
	a.srv.log.Info("agent attested", "agent", id.String(), "method", method, "node", claim.Node)
	return &agentv1.AttestResponse{SvidChain: chain, SpiffeId: id.String(), AgentId: id.String(), Bundle: a.srv.agentBundle()}, nil
}

// Renew implements agentv1.AgentServiceServer.
func (a *AgentService) Renew(ctx context.Context, req *agentv1.RenewRequest) (*agentv1.RenewResponse, error) {
	id, err := a.agentCaller(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := ca.ParseCSR(req.GetCsr()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	chain, err := a.srv.signNodeSVID(ctx, id, req.GetCsr(), "agent renewal")
	if err != nil {
		return nil, a.srv.agentStatus("renew", err)
	}
	if err := a.srv.recordRenewed(ctx, id, chain); err != nil {
		return nil, a.srv.agentStatus("renew", err)
	}
	return &agentv1.RenewResponse{SvidChain: chain}, nil
}

// signNodeSVID signs an agent's node SVID for the key in csr.
func (s *Server) signNodeSVID(ctx context.Context, id spiffeid.ID, csr []byte, requester string) ([][]byte, error) {
	svid, err := s.MintX509SVID(ctx, MintRequest{SpiffeID: id.String(), CSR: csr, Requester: requester})
	if err != nil {
		return nil, err
	}
	return append([][]byte{svid.CertDER}, svid.ChainDER...), nil
}

// agentStatus maps a server error to the gRPC status an agent gets.
func (s *Server) agentStatus(op string, err error) error {
	var inv *InvalidArgumentError
	var fp *FailedPreconditionError
	switch {
	case errors.As(err, &inv):
		return status.Error(codes.InvalidArgument, inv.Error())
	case errors.As(err, &fp):
		return status.Error(codes.FailedPrecondition, fp.Error())
	case errors.Is(err, store.ErrUnavailable):
		return status.Errorf(codes.Unavailable, "%s: %v", op, err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.FromContextError(err).Err()
	}
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		return err
	}
	s.log.Error("agent api", "op", op, "err", err)
	return status.Errorf(codes.Internal, "%s failed", op)
}

// mayServe says whether the agent id may serve entry e: an entry without a
// parent may be served by every agent.
func mayServe(e store.Entry, id spiffeid.ID) bool {
	return e.ParentID == "" || e.ParentID == id.String()
}

// SignX509SVIDs implements agentv1.AgentServiceServer. Items are signed
// concurrently, so their inventory rows share commits (group commit).
func (a *AgentService) SignX509SVIDs(ctx context.Context, req *agentv1.SignX509SVIDsRequest) (*agentv1.SignX509SVIDsResponse, error) {
	id, err := a.agentCaller(ctx)
	if err != nil {
		return nil, err
	}
	if n := len(req.GetCsrs()); n == 0 || n > MaxSignBatch {
		return nil, status.Errorf(codes.InvalidArgument, "send 1 to %d CSRs per call, not %d", MaxSignBatch, n)
	}
	if err := a.srv.agentLim.allowSign(id.String(), len(req.GetCsrs())); err != nil {
		return nil, err
	}
	out := make([]*agentv1.SignedX509SVID, len(req.GetCsrs()))
	// More in flight than signing slots: the signing limiter bounds the
	// CPU, and the rows waiting for their commit then share fsyncs.
	sem := make(chan struct{}, batchParallelism)
	var wg sync.WaitGroup
	for i, item := range req.GetCsrs() {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			out[i] = a.signOne(ctx, id, item)
		})
	}
	wg.Wait()
	return &agentv1.SignX509SVIDsResponse{Svids: out}, nil
}

func (a *AgentService) signOne(ctx context.Context, agent spiffeid.ID, item *agentv1.CSRForEntry) *agentv1.SignedX509SVID {
	res := &agentv1.SignedX509SVID{EntryId: item.GetEntryId()}
	fail := func(err error) *agentv1.SignedX509SVID {
		st := status.Convert(err)
		res.Code, res.Message = int32(st.Code()), st.Message()
		return res
	}
	e, err := a.srv.agentEntry(agent, item.GetEntryId())
	if err != nil {
		return fail(err)
	}
	csr, err := ca.ParseCSR(item.GetCsr()) // its signature checked: the agent holds the key
	if err != nil {
		return fail(status.Errorf(codes.InvalidArgument, "csr for entry %s: %v", e.ID, err))
	}
	// The SAN is the entry's, whatever the CSR asks for; the key is the
	// CSR's, parsed and checked once, here.
	svid, err := a.srv.MintX509SVID(ctx, MintRequest{SpiffeID: e.SpiffeID, publicKey: csr.PublicKey, DNSNames: e.DNSNames, TTL: e.TTL,
		EntryID: e.ID, Requester: "workload via agent " + agent.String(), ClampTTL: true})
	if err != nil {
		return fail(a.srv.agentStatus("sign", err))
	}
	// Banned while this was signed: not handed out. BanAgent reads the
	// inventory only once the ban is applied here, so what passes this
	// check is on the CRL.
	if err := a.srv.refuseBanned(agent); err != nil {
		return fail(err)
	}
	res.SvidChain = append([][]byte{svid.CertDER}, svid.ChainDER...)
	return res
}

// SignJWTSVID implements agentv1.AgentServiceServer.
func (a *AgentService) SignJWTSVID(ctx context.Context, req *agentv1.SignJWTSVIDRequest) (*agentv1.SignJWTSVIDResponse, error) {
	agent, err := a.agentCaller(ctx)
	if err != nil {
		return nil, err
	}
	e, err := a.srv.agentEntry(agent, req.GetEntryId())
	if err != nil {
		return nil, err
	}
	if len(req.GetAudience()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	sid, err := spiffeid.FromString(e.SpiffeID)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "entry %s names an invalid spiffe id", e.ID)
	}
	a.srv.mu.RLock()
	j := a.srv.jwt
	a.srv.mu.RUnlock()
	tok, exp, err := j.MintJWTSVID(sid, req.GetAudience(), a.srv.cfg.JWTTTL, a.srv.now())
	if err != nil {
		a.srv.metrics.IssueErrors.Inc()
		if errors.Is(err, ca.ErrInvalidJWTRequest) {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		return nil, a.srv.agentStatus("sign jwt", err)
	}
	a.srv.metrics.Issued.WithLabelValues("jwt").Inc()
	return &agentv1.SignJWTSVIDResponse{Token: tok, ExpiresAt: timestamppb.New(exp)}, nil
}
