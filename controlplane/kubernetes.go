package controlplane

import (
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/store"
)

// Kubernetes: agents attest with projected service-account tokens (a
// NodeAttestor, kube/psat) and, with DefaultIdentities, every pod gets
// spiffe://<td>/ns/<namespace>/sa/<serviceaccount> from the agent on its
// node without an entry, as in Istio. The server decides which: it serves
// an agent the default identities of the service accounts the API server
// says have pods on that agent's node, and nothing else, so a compromised
// node cannot obtain the identity of a workload that does not run there.

// NodeWorkloads says which service accounts have pods on a node
// (kube/nodepods watches the API server for it).
type NodeWorkloads interface {
	// ServiceAccounts lists "namespace/name" of the service accounts with
	// a pod on node that still needs an identity, sorted, and a
	// generation that changes whenever the list may have.
	ServiceAccounts(node string) (sas []string, gen uint64)
}

// defaultEntryPrefix starts the IDs of the entries the server derives for
// default identities; user entry IDs (UUIDs) never contain a colon.
const defaultEntryPrefix = "k8s-default:"

// nodeAttestor returns the NodeAttestor for method, if configured.
func (s *Server) nodeAttestor(method string) (attest.NodeAttestor, bool) {
	for _, a := range s.cfg.NodeAttestors {
		if a.Method() == method {
			return a, true
		}
	}
	return nil, false
}

// attestMethods lists the methods this server takes, for messages.
func (s *Server) attestMethods() string {
	m := []string{methodJoinToken}
	for _, a := range s.cfg.NodeAttestors {
		m = append(m, a.Method())
	}
	return strings.Join(m, ", ")
}

// agentIDFor is the agent ID of a checked claim: each segment one node
// name's worth of characters.
func (s *Server) agentIDFor(method string, claim attest.NodeClaim) (spiffeid.ID, error) {
	if len(claim.Path) == 0 {
		return spiffeid.ID{}, fmt.Errorf("attestor %s named no node", method)
	}
	segs := []string{"meshid", "agent", method}
	for _, p := range claim.Path {
		if !nodeIDPattern.MatchString(p) {
			return spiffeid.ID{}, fmt.Errorf("attestor %s: node path segment %q is not one of 1 to 63 letters, digits, '.', '_' or '-'", method, p)
		}
		segs = append(segs, p)
	}
	return spiffeid.FromSegments(s.td, segs...)
}

// defaultEntries are the entries the server derives for the default
// identities agent id may serve, by ID: one per service account with a pod
// on the agent's node, unless an entry already names that SPIFFE ID (then
// the entries govern it: an operator narrows a default identity by writing
// an entry for it) or its namespace is excluded. gen changes whenever the
// set may have.
func (s *Server) defaultEntries(id spiffeid.ID) (out []store.Entry, gen uint64) {
	dw := s.cfg.DefaultIdentities
	if dw == nil {
		return nil, 0
	}
	rec, ok := s.agentRecord(id.String())
	if !ok || rec.Method != methodK8sPSAT || rec.Node == "" {
		return nil, 0
	}
	sas, gen := dw.ServiceAccounts(rec.Node)
	for _, nsa := range sas {
		ns, sa, ok := strings.Cut(nsa, "/")
		if !ok || slices.Contains(s.cfg.ExcludeNamespaces, ns) {
			continue
		}
		sid, err := spiffeid.FromSegments(s.td, "ns", ns, "sa", sa)
		if err != nil {
			continue
		}
		if len(s.entries.bySpiffeID(sid.String())) > 0 {
			continue
		}
		out = append(out, store.Entry{
			ID:        defaultEntryPrefix + ns + "/" + sa,
			SpiffeID:  sid.String(),
			Selectors: []store.Selector{{Type: "k8s", Value: "ns:" + ns}, {Type: "k8s", Value: "sa:" + sa}},
			ParentID:  id.String(),
		})
	}
	return out, gen
}

// agentEntry is entry eid if agent may serve it: an entry of the store, or
// one of its default identities.
func (s *Server) agentEntry(agent spiffeid.ID, eid string) (store.Entry, error) {
	if strings.HasPrefix(eid, defaultEntryPrefix) {
		des, _ := s.defaultEntries(agent)
		for _, e := range des {
			if e.ID == eid {
				return e, nil
			}
		}
		return store.Entry{}, errNotServed(agent, eid, "no pod of that service account runs on its node")
	}
	e, ok := s.entries.get(eid)
	if !ok {
		return store.Entry{}, errNoEntry(eid)
	}
	if !mayServe(e, agent) {
		return store.Entry{}, errNotServed(agent, eid, "its parent is "+e.ParentID)
	}
	return e, nil
}

func errNoEntry(eid string) error { return status.Errorf(codes.NotFound, "no entry %q", eid) }

func errNotServed(agent spiffeid.ID, eid, why string) error {
	return status.Errorf(codes.PermissionDenied, "agent %s may not serve entry %s: %s", agent, eid, why)
}

// NodeWorkloadsChanged tells the server the service accounts with pods on
// node may have changed: the Sync streams of that node's agents recompute
// what they serve.
func (s *Server) NodeWorkloadsChanged(node string) {
	s.agents.wakeNode(methodK8sPSAT, node)
}

// BundlePEM is the trust bundle last published: the CA certificates, PEM
// (nil before the first).
func (s *Server) BundlePEM() []byte {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	if s.lastX509 == nil {
		return nil
	}
	return s.lastX509.PEM
}
