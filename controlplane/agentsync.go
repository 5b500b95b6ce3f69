package controlplane

import (
	"encoding/binary"
	"hash/maphash"
	"slices"
	"strings"
	"sync"
	"time"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"

	"github.com/meshid/meshid/store"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

// sentEntry is what a Sync stream remembers of an entry it sent: its ID
// (the server's own string, not a copy) and a digest of what was sent.
// The stream used to keep the protos themselves, ~4 KiB per agent of ten
// entries, only to compare them with the next pass.
type sentEntry struct {
	id   string
	hash uint64
}

// entrySeed keys entryHash; digests are compared only within this process.
var entrySeed = maphash.MakeSeed()

// entryHash digests every field of e that agentEntryProto sends, each
// length-prefixed so that no two entries run together alike. Two
// different entries digest alike with probability 2^-64: the change would
// then reach the agent with the entry's next one, or its next stream.
func entryHash(e store.Entry) uint64 {
	var h maphash.Hash
	h.SetSeed(entrySeed)
	var b [8]byte
	num := func(v uint64) {
		binary.LittleEndian.PutUint64(b[:], v)
		_, _ = h.Write(b[:])
	}
	str := func(v string) {
		num(uint64(len(v)))
		_, _ = h.WriteString(v)
	}
	str(e.ID)
	str(e.SpiffeID)
	num(uint64(e.TTL / time.Second))
	num(uint64(len(e.DNSNames)))
	for _, d := range e.DNSNames {
		str(d)
	}
	str(e.Hint)
	str(e.ParentID)
	num(uint64(len(e.Selectors)))
	for _, sel := range e.Selectors {
		str(sel.Type)
		str(sel.Value)
	}
	return h.Sum64()
}

// Sync implements agentv1.AgentServiceServer: a full snapshot, then every
// change, each computed as the difference between what this stream sent
// (IDs and digests, sorted by ID) and what the agent may see now, so
// changes that come faster than the agent reads coalesce instead of
// queueing. It is a server stream: the agent reports by ReportBundles,
// and the only goroutine a stream holds is this one.
func (a *AgentService) Sync(_ *agentv1.SyncRequest, stream agentv1.AgentService_SyncServer) error {
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

	var sent []sentEntry
	bundleVersion, jwtVersion := "", ""
	full := true
	var sentGen [2]uint64
	for {
		resp := &agentv1.SyncResponse{Full: full}
		// Entries are compared only when one changed since the last
		// pass: a bundle change (a revocation, a CA step) wakes every
		// stream, and must not cost each a walk of its entries.
		if gen := a.srv.entriesGen(id); full || gen != sentGen {
			sentGen = gen
			entries := a.srv.agentEntries(id) // sorted by ID
			now := make([]sentEntry, 0, len(entries))
			k := 0 // sent[k:] are the IDs not yet passed
			for _, e := range entries {
				for ; k < len(sent) && sent[k].id < e.ID; k++ {
					resp.DeletedEntryIds = append(resp.DeletedEntryIds, sent[k].id)
				}
				h := entryHash(e)
				now = append(now, sentEntry{id: e.ID, hash: h})
				same := k < len(sent) && sent[k].id == e.ID && sent[k].hash == h
				if k < len(sent) && sent[k].id == e.ID {
					k++
				}
				if full || !same {
					resp.Entries = append(resp.Entries, agentEntryProto(e))
				}
			}
			for ; k < len(sent); k++ {
				resp.DeletedEntryIds = append(resp.DeletedEntryIds, sent[k].id)
			}
			if full {
				resp.DeletedEntryIds = nil
			}
			sent = now
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
		full = false
		select {
		case <-st.notify:
		case err := <-st.kill:
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
