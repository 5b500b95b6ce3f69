package controlplane

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"time"

	"github.com/meshid/meshid/store"
)

// Bundle convergence across replicas. An agent reports to the replica it
// is connected to, but only the leader gates CA activation: counting its
// own agents alone, a leader with none connected would see "no streams",
// a ratio of 1, and activate while every agent on the followers still
// holds an old bundle. So each replica of a shared store (store.Clustered)
// publishes its agents' convergence with its announcement, and reads its
// peers': the gate and meshid status sum them all. A replica that dies
// drops out with its lease; its agents reconnect elsewhere and report
// there.

// peerInterval is how often a replica publishes its agents' convergence
// (when it changed) and reads its peers'. Activation is gated over hours;
// a second is plenty. It is wall time, not the injected clock: it paces
// I/O, it decides no expiry.
const peerInterval = time.Second

// maxPublishedAgents caps the per-agent rows one replica publishes; past
// it only the totals go out (the gate needs only those).
const maxPublishedAgents = 1000

// peerSummary is what a replica publishes about its connected agents.
type peerSummary struct {
	// PreparedCA is the prepared CA the Prepared counts are about ("" if
	// none was prepared when the replica counted).
	PreparedCA string      `json:"prepared_ca,omitempty"`
	Streams    int         `json:"streams"`
	Newest     int         `json:"newest"`
	Prepared   int         `json:"prepared"`
	Agents     []peerAgent `json:"agents,omitempty"`
}

type peerAgent struct {
	ID       string `json:"id"`
	Reported bool   `json:"reported,omitempty"`
	Streams  int    `json:"streams"`
	Newest   int    `json:"newest"`
	Prepared int    `json:"prepared"`
}

// peerState is this replica's view of its peers.
type peerState struct {
	mu    sync.Mutex
	self  string
	addrs []string
	last  []byte // the announcement last made, to skip unchanged ones
	peers map[string]peerSummary
	kick  chan struct{} // a publication wanted now (announce)
}

func (p *peerState) poke() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// peerLoop runs peerTick at once and every peerInterval, and when poked,
// until ctx ends.
func (s *Server) peerLoop(ctx context.Context) {
	t := time.NewTicker(peerInterval)
	defer t.Stop()
	for {
		s.peerTick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.peer.kick:
		}
	}
}

// peerTick publishes this replica's convergence if it changed, reads the
// peers', and re-runs a held activation when they moved.
func (s *Server) peerTick(ctx context.Context) {
	c, ok := s.store.(store.Clustered)
	if !ok {
		return
	}
	sum := s.ownSummary()
	body, err := json.Marshal(sum)
	if err != nil {
		s.log.Error("encode convergence for the peers", "err", err)
		return
	}
	s.peer.mu.Lock()
	addrs := s.peer.addrs
	// What is announced is the body and the addresses: compared together,
	// so addresses set while an announcement without them was in flight
	// still go out.
	said := append(append([]byte(strings.Join(addrs, " ")), 0), body...)
	changed := !bytes.Equal(said, s.peer.last)
	s.peer.mu.Unlock()
	tctx, cancel := context.WithTimeout(ctx, clusterTimeout)
	defer cancel()
	if changed {
		if err := c.Announce(tctx, store.Replica{Version: s.cfg.Version, StartedAt: s.startedAt, Addresses: addrs, Convergence: body}); err != nil {
			s.log.Warn("publishing this replica's agents' convergence failed; retrying", "err", err)
			return
		}
		s.peer.mu.Lock()
		s.peer.last = said
		s.peer.mu.Unlock()
	}
	self, replicas, err := c.Replicas(tctx)
	if err != nil {
		s.log.Debug("reading the peers' convergence failed", "err", err)
		return
	}
	peers := map[string]peerSummary{}
	for _, r := range replicas {
		if r.ID == self || len(r.Convergence) == 0 {
			continue
		}
		var p peerSummary
		if err := json.Unmarshal(r.Convergence, &p); err != nil {
			s.log.Warn("a peer published convergence this version cannot read", "replica", r.ID, "err", err)
			continue
		}
		peers[r.ID] = p
	}
	s.peer.mu.Lock()
	s.peer.self = self
	moved := !peersEqual(s.peer.peers, peers)
	s.peer.peers = peers
	s.peer.mu.Unlock()
	if moved {
		s.convergenceChanged()
	}
}

// ownSummary counts this replica's connected agents.
func (s *Server) ownSummary() peerSummary {
	var sum peerSummary
	p := s.preparedCA()
	var conv []agentConvergence
	if p != nil {
		sum.PreparedCA = p.rec.ID
		conv = s.convergence(s.newestBundle(), p.root)
	} else {
		conv = s.convergence(s.newestBundle(), nil)
	}
	for _, a := range conv {
		sum.Streams += a.streams
		sum.Newest += a.newest
		sum.Prepared += a.preparedN
		if len(conv) <= maxPublishedAgents {
			sum.Agents = append(sum.Agents, peerAgent{ID: a.id, Reported: a.reported, Streams: a.streams, Newest: a.newest, Prepared: a.preparedN})
		}
	}
	return sum
}

// peerConvergence sums the peers' streams and, for preparedID, those
// holding it.
func (s *Server) peerConvergence(preparedID string) (streams, holding int) {
	s.peer.mu.Lock()
	defer s.peer.mu.Unlock()
	for _, p := range s.peer.peers {
		streams += p.Streams
		if preparedID != "" && p.PreparedCA == preparedID {
			holding += min(p.Prepared, p.Streams)
		}
	}
	return streams, holding
}

// peerAgents lists the peers' agents, by replica.
func (s *Server) peerAgents() (self string, byReplica map[string]peerSummary) {
	s.peer.mu.Lock()
	defer s.peer.mu.Unlock()
	return s.peer.self, s.peer.peers
}

func peersEqual(a, b map[string]peerSummary) bool {
	if len(a) != len(b) {
		return false
	}
	for k, x := range a {
		y, ok := b[k]
		if !ok || x.PreparedCA != y.PreparedCA || x.Streams != y.Streams || x.Prepared != y.Prepared || x.Newest != y.Newest {
			return false
		}
	}
	return true
}
