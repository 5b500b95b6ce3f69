package controlplane

import (
	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
)

// grpcMetrics are the standard gRPC server metrics from go-grpc-middleware's
// Prometheus provider, so dashboards and alerts written for it work as they
// are: grpc_server_started_total, grpc_server_handled_total,
// grpc_server_msg_{received,sent}_total and grpc_server_handling_seconds
// (for streams too: an SDS or Workload API stream's histogram sample is its
// lifetime).
type grpcMetrics struct {
	m *grpcprom.ServerMetrics
}

// grpcHandlingBuckets are finer than the provider's default at the low end:
// most admin and mint RPCs finish in well under 5 ms.
var grpcHandlingBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}

// newGRPCMetrics registers on reg, the server's own registry, so two servers
// in one process (tests, or an agent beside a server) never collide on the
// global one.
func newGRPCMetrics(reg prometheus.Registerer) *grpcMetrics {
	m := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(grpcprom.WithHistogramBuckets(grpcHandlingBuckets)))
	reg.MustRegister(m)
	return &grpcMetrics{m: m}
}

// options are the interceptors every gRPC server of this process installs.
func (g *grpcMetrics) options() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(g.m.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(g.m.StreamServerInterceptor()),
	}
}
