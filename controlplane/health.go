package controlplane

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// healths gives each gRPC server a health service of its own, so a
// listener reports only the services it really serves: a grpc-health-probe
// or Kubernetes gRPC probe names the one it depends on
// (envoy.service.secret.v3.SecretDiscoveryService, SpiffeWorkloadAPI, the
// admin API), and the workload socket must not claim the admin API.
type healths struct {
	servers []*grpc.Server
	hs      []*health.Server
}

// register adds a health service to g.
func (h *healths) register(g *grpc.Server) {
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	h.servers = append(h.servers, g)
	h.hs = append(h.hs, hs)
}

// serving reports SERVING for every service each server registered, not
// only for "".
func (h *healths) serving() {
	for i, g := range h.servers {
		for name := range g.GetServiceInfo() {
			h.hs[i].SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
		}
	}
}

// shutdown turns every status NOT_SERVING, for the drain.
func (h *healths) shutdown() {
	for _, hs := range h.hs {
		hs.Shutdown()
	}
}
