package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/entry"
	"github.com/meshid/meshid/identity"
	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
	"github.com/meshid/meshid/svidcache"
)

// errNotConnected is what a mint gets while the server is unreachable; the
// cache keeps what it holds and retries with backoff.
var errNotConnected = status.Error(codes.Unavailable, "not connected to the meshid server")

// batchWindow is how long the first CSR of a batch waits for others: the
// renewals of a whole node, due together after a reconnect or a CA
// rotation, then go in one round trip instead of one each.
const batchWindow = 5 * time.Millisecond

// maxBatch is the most CSRs one call carries (the server's limit).
const maxBatch = 1000

// remoteSigner is the agent's svidcache.Signer: CSRs (keys made by the
// cache, on this node) signed by the server through the agent API,
// coalesced into batches.
type remoteSigner struct {
	a *Agent

	mu      sync.Mutex
	pending []*signReq
	armed   bool
}

type signReq struct {
	entryID string
	csr     []byte
	ctx     context.Context
	done    chan signResult // buffered 1
}

type signResult struct {
	chain [][]byte
	err   error
}

// SignX509SVID implements svidcache.Signer.
func (r *remoteSigner) SignX509SVID(ctx context.Context, e svidcache.Entry, csr []byte) ([][]byte, error) {
	req := &signReq{entryID: e.ID, csr: csr, ctx: ctx, done: make(chan signResult, 1)}
	r.mu.Lock()
	r.pending = append(r.pending, req)
	if !r.armed {
		r.armed = true
		time.AfterFunc(batchWindow, r.flush)
	}
	r.mu.Unlock()
	select {
	case res := <-req.done:
		return res.chain, res.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// flush sends what is pending, maxBatch at a time.
func (r *remoteSigner) flush() {
	r.mu.Lock()
	batch := r.pending
	r.pending, r.armed = nil, false
	r.mu.Unlock()
	r.a.mu.Lock()
	client := r.a.client
	r.a.mu.Unlock()
	for len(batch) > 0 {
		n := min(len(batch), maxBatch)
		r.send(client, batch[:n])
		batch = batch[n:]
	}
}

func (r *remoteSigner) send(client agentv1.AgentServiceClient, batch []*signReq) {
	fail := func(err error) {
		for _, q := range batch {
			q.done <- signResult{err: err}
		}
	}
	if client == nil {
		fail(errNotConnected)
		return
	}
	// Bounded by the longest wait among the requests (renewals queue up
	// to 30 s at the server); a request already abandoned is not sent.
	var live []*signReq
	deadline := time.Now().Add(time.Minute)
	for _, q := range batch {
		if q.ctx.Err() != nil {
			q.done <- signResult{err: q.ctx.Err()}
			continue
		}
		live = append(live, q)
		if d, ok := q.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
	}
	if len(live) == 0 {
		return
	}
	batch = live
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	req := &agentv1.SignX509SVIDsRequest{}
	for _, q := range batch {
		req.Csrs = append(req.Csrs, &agentv1.CSRForEntry{EntryId: q.entryID, Csr: q.csr})
	}
	resp, err := client.SignX509SVIDs(ctx, req)
	if err != nil {
		fail(fmt.Errorf("sign %d csr(s): %w", len(batch), err))
		return
	}
	if len(resp.GetSvids()) != len(batch) {
		fail(fmt.Errorf("server answered %d of %d csrs", len(resp.GetSvids()), len(batch)))
		return
	}
	for i, q := range batch {
		s := resp.GetSvids()[i]
		if s.GetCode() != 0 {
			q.done <- signResult{err: status.Error(codes.Code(s.GetCode()), s.GetMessage())}
			continue
		}
		q.done <- signResult{chain: s.GetSvidChain()}
	}
}

// matcher is the agent's svidcache.Matcher: the entries synced from the
// server whose selectors the caller has.
type matcher struct{ a *Agent }

func (m matcher) Match(c identity.Caller) []svidcache.Entry {
	var out []svidcache.Entry
	for _, e := range m.a.index.Match(c.Selectors) {
		out = append(out, cacheEntry(e))
	}
	return out
}

// Admit re-checks the caller once its subscription is registered: a pod
// deleted while it subscribed is either seen here or ends the
// subscription (podChanged), never neither.
func (matcher) Admit(c identity.Caller) error { return c.Recheck() }

func cacheEntry(e entry.Entry) svidcache.Entry {
	hint := e.Hint
	if hint == "" {
		hint = e.ID
	}
	return svidcache.Entry{ID: e.ID, SpiffeID: e.SpiffeID, DNSNames: e.DNSNames, TTL: e.TTL, Hint: hint}
}

// source is what the agent's workload socket serves: the cache, and
// JWT-SVIDs signed by the server for the caller's entries.
type source struct{ a *Agent }

func (s source) Subscribe(ctx context.Context, caller identity.Caller) (identity.Subscription, error) {
	return s.a.cache.Subscribe(ctx, caller)
}

func (s source) MintJWTSVID(ctx context.Context, caller identity.Caller, audience []string, id string) ([]*identity.JWTSVID, error) {
	if len(audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience is required")
	}
	s.a.mu.Lock()
	client := s.a.client
	s.a.mu.Unlock()
	var out []*identity.JWTSVID
	seen := map[string]bool{}
	for _, e := range s.a.index.Match(caller.Selectors) {
		if seen[e.SpiffeID] || (id != "" && e.SpiffeID != id) {
			continue
		}
		seen[e.SpiffeID] = true
		if client == nil {
			return nil, errNotConnected
		}
		resp, err := client.SignJWTSVID(ctx, &agentv1.SignJWTSVIDRequest{EntryId: e.ID, Audience: audience})
		if err != nil {
			return nil, err
		}
		sid, err := spiffeid.FromString(e.SpiffeID)
		if err != nil {
			return nil, err
		}
		hint := e.Hint
		if hint == "" {
			hint = e.ID
		}
		out = append(out, &identity.JWTSVID{ID: sid, Token: resp.GetToken(), Hint: hint, ExpiresAt: resp.GetExpiresAt().AsTime()})
	}
	if len(out) == 0 {
		if id != "" {
			return nil, fmt.Errorf("%s: %w", id, identity.ErrNotEntitled)
		}
		return nil, identity.ErrNotEntitled
	}
	return out, nil
}
