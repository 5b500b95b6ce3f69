package controlplane

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// markServing reports SERVING for every service the servers registered,
// not only for "": a grpc-health-probe or Kubernetes gRPC probe names the
// service it depends on (envoy.service.secret.v3.SecretDiscoveryService,
// SpiffeWorkloadAPI, the admin API). hs.Shutdown on drain turns them all
// NOT_SERVING. nil servers (endpoints not configured) are skipped.
func markServing(hs *health.Server, servers ...*grpc.Server) {
	for _, g := range servers {
		if g == nil {
			continue
		}
		for name := range g.GetServiceInfo() {
			hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
		}
	}
}
