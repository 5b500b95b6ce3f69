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
// it serves, so meshid status on any replica lists it; a store of one
// process has nothing to announce.
func (s *Server) announce(ctx context.Context, l Listening) {
	c, ok := s.store.(store.Clustered)
	if !ok {
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
	actx, cancel := context.WithTimeout(ctx, clusterTimeout)
	defer cancel()
	if err := c.Announce(actx, store.Replica{Version: s.cfg.Version, StartedAt: s.startedAt, Addresses: addrs}); err != nil {
		// Informational only: the replica serves without it.
		s.log.Warn("announcing this replica in the store failed; meshid status will not list it", "err", err)
	}
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
