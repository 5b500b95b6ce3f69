package controlplane

import (
	"context"
	"os"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// clusterTimeout bounds the store's cluster read in a Status call: a
// status must answer while etcd has lost its quorum, saying so.
const clusterTimeout = 3 * time.Second

// announce registers this replica in a store shared by several (etcd) once
// it serves, with the addresses it serves on, so meshid status on any
// replica lists it; a store of one process has nothing to announce.
func (s *Server) announce(_ context.Context, l Listening) {
	if _, ok := s.store.(store.Clustered); !ok {
		return
	}
	var addrs []string
	for _, a := range []struct{ name, addr string }{
		{"agent", l.AgentAddr}, {"sds", l.SDSAddr}, {"sds-rest", l.SDSRESTAddr}, {"metrics", l.MetricsAddr},
	} {
		if a.addr != "" {
			addrs = append(addrs, a.name+"="+a.addr)
		}
	}
	s.peer.mu.Lock()
	s.peer.addrs = addrs
	s.peer.mu.Unlock()
	s.peer.poke()
}

// storeStatus is the store part of meshid status.
func (s *Server) storeStatus(ctx context.Context) *adminv1.StoreStatus {
	st := &adminv1.StoreStatus{Backend: "bolt"}
	if err := s.store.Health(); err != nil {
		st.Health = err.Error()
	}
	c, ok := s.store.(store.Clustered)
	if !ok {
		st.Replica, _ = os.Hostname()
		if rev, err := s.store.Revision(ctx); err == nil {
			st.Revision = rev
		}
		if s.Leading() {
			st.Leader = st.Replica
		}
		st.Replicas = []*adminv1.ReplicaStatus{{Id: st.Replica, Version: s.cfg.Version, StartedAt: timestamppb.New(s.startedAt)}}
		return st
	}
	cctx, cancel := context.WithTimeout(ctx, clusterTimeout)
	defer cancel()
	cs, err := c.Cluster(cctx)
	if cs.Backend != "" {
		st.Backend = cs.Backend
	}
	if err != nil && st.Health == "" {
		st.Health = "reading the cluster: " + err.Error()
	}
	st.Revision, st.Leader, st.Replica = cs.Revision, cs.Leader, cs.Self
	for _, r := range cs.Replicas {
		st.Replicas = append(st.Replicas, &adminv1.ReplicaStatus{Id: r.ID, Version: r.Version, StartedAt: timestamppb.New(r.StartedAt), Addresses: r.Addresses})
	}
	for _, m := range cs.Members {
		st.EtcdMembers = append(st.EtcdMembers, &adminv1.EtcdMemberStatus{Name: m.Name, Endpoint: m.Endpoint, Healthy: m.Healthy,
			Leader: m.Leader, Error: m.Error, Revision: m.Revision, DbSizeBytes: m.DBSize})
	}
	return st
}
