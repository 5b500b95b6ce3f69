package controlplane

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"

	"github.com/meshid/meshid/store"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// parentIndex is the entry IDs by parent ("" for none): what one agent may
// serve is two of its sets, not a walk of every entry.
type parentIndex struct {
	mu  sync.RWMutex
	ids map[string]map[string]struct{}
}

func (p *parentIndex) add(e store.Entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ids == nil {
		p.ids = map[string]map[string]struct{}{}
	}
	set := p.ids[e.ParentID]
	if set == nil {
		set = map[string]struct{}{}
		p.ids[e.ParentID] = set
	}
	set[e.ID] = struct{}{}
}

func (p *parentIndex) remove(e store.Entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if set := p.ids[e.ParentID]; set != nil {
		delete(set, e.ID)
		if len(set) == 0 {
			delete(p.ids, e.ParentID)
		}
	}
}

// of lists the IDs of entries with no parent and with parent.
func (p *parentIndex) of(parent string) []string {
	p.mu.RLock()
	defer p.mu.RUnlock()
	out := make([]string, 0, len(p.ids[""])+len(p.ids[parent]))
	for id := range p.ids[""] {
		out = append(out, id)
	}
	for id := range p.ids[parent] {
		out = append(out, id)
	}
	return out
}

// agentEntries lists, by ID, the entries agent id may serve: its store
// entries and its default identities (kubernetes.go).
func (s *Server) agentEntries(id spiffeid.ID) []store.Entry {
	out, _ := s.defaultEntries(id)
	for _, eid := range s.byParent.of(id.String()) {
		if e, ok := s.entries.get(eid); ok && mayServe(e, id) {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b store.Entry) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// entriesGen changes whenever what agent id may serve may have: an entry
// changed, or the pods on its node did.
func (s *Server) entriesGen(id spiffeid.ID) [2]uint64 {
	g := [2]uint64{uint64(s.entryGen.Load())}
	if dw := s.cfg.DefaultIdentities; dw != nil {
		if rec, ok := s.agentRecord(id.String()); ok && rec.Method == methodK8sPSAT {
			_, g[1] = dw.ServiceAccounts(rec.Node)
		}
	}
	return g
}

// agentBundle is the bundle last published, as the agent API carries it.
func (s *Server) agentBundle() *agentv1.Bundle {
	s.pubMu.Lock()
	xb, jb := s.lastX509, s.lastJWT
	s.pubMu.Unlock()
	b := &agentv1.Bundle{TrustDomain: s.td.String()}
	if xb != nil {
		for _, c := range xb.X509Authorities {
			b.X509Authorities = append(b.X509Authorities, c.Raw)
		}
		b.Crls, b.CrlLeafOnly, b.Version = xb.CRLs, xb.CRLLeafOnly, xb.Version
	}
	if jb != nil {
		b.Jwks, b.JwtVersion = jb.JWKS, jb.Version
	}
	return b
}

func agentEntryProto(e store.Entry) *agentv1.Entry {
	p := &agentv1.Entry{Id: e.ID, SpiffeId: e.SpiffeID, TtlSeconds: int64(e.TTL / time.Second), DnsNames: e.DNSNames, Hint: e.Hint, ParentId: e.ParentID}
	for _, sel := range e.Selectors {
		p.Selectors = append(p.Selectors, &agentv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	return p
}

// Sync implements agentv1.AgentServiceServer: a full snapshot, then every
// change, each computed as the difference between what this stream sent
// and what the agent may see now, so changes that come faster than the
// agent reads coalesce instead of queueing.
func (a *AgentService) Sync(stream agentv1.AgentService_SyncServer) error {
	ctx := stream.Context()
	id, err := a.agentCaller(ctx)
	if err != nil {
		return err
	}
	st := &agentStream{id: id, notify: make(chan struct{}, 1), kill: make(chan error, 1)}
	if err := a.srv.agents.add(st); err != nil {
		return err
	}
	defer func() {
		a.srv.agents.remove(st)
		a.srv.convergenceChanged() // its streams no longer hold activation back
	}()
	if err := a.srv.agentConnected(ctx, st); err != nil {
		return err
	}
	defer a.srv.agentDisconnected(ctx, id)
	a.srv.log.Info("agent connected", "agent", id.String())
	defer a.srv.log.Info("agent disconnected", "agent", id.String())

	recvErr := make(chan error, 1)
	go func() { // ends when the stream does: Recv fails once the handler returns
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if r := req.GetReport(); r != nil {
				st.report.Lock()
				st.report.r = r
				st.report.Unlock()
				a.srv.reportChanged()
			}
		}
	}()

	sent := map[string]*agentv1.Entry{}
	bundleVersion, jwtVersion := "", ""
	full := true
	var sentGen [2]uint64
	for {
		resp := &agentv1.SyncResponse{Full: full}
		now := sent
		// Entries are compared only when one changed since the last
		// pass: a bundle change (a revocation, a CA step) wakes every
		// stream, and must not cost each a walk of its entries.
		if gen := a.srv.entriesGen(id); full || gen != sentGen {
			sentGen = gen
			now = map[string]*agentv1.Entry{}
			for _, e := range a.srv.agentEntries(id) {
				p := agentEntryProto(e)
				now[e.ID] = p
				if old, ok := sent[e.ID]; full || !ok || !proto.Equal(old, p) {
					resp.Entries = append(resp.Entries, p)
				}
			}
			if !full {
				for eid := range sent {
					if _, ok := now[eid]; !ok {
						resp.DeletedEntryIds = append(resp.DeletedEntryIds, eid)
					}
				}
				slices.Sort(resp.DeletedEntryIds)
			}
		}
		if b := a.srv.agentBundle(); full || b.Version != bundleVersion || b.JwtVersion != jwtVersion {
			resp.Bundle = b
			bundleVersion, jwtVersion = b.Version, b.JwtVersion
			a.srv.agents.versions.note(b) // before the agent can report it
		}
		a.srv.proj.mu.Lock()
		resp.Revision = a.srv.proj.applied
		a.srv.proj.mu.Unlock()
		if full || len(resp.Entries) > 0 || len(resp.DeletedEntryIds) > 0 || resp.Bundle != nil {
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
		sent, full = now, false
		select {
		case <-st.notify:
		case err := <-st.kill:
			return err
		case err := <-recvErr:
			if status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		case <-ctx.Done():
			return nil
		case <-a.done:
			return status.Error(codes.Unavailable, "server shutting down")
		case <-a.srv.tasks.ctx.Done():
			return status.Error(codes.Unavailable, "server shutting down")
		}
	}
}
