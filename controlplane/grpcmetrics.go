package controlplane

import (
	"context"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// grpcMetrics are the standard gRPC server metrics (the names
// go-grpc-middleware's Prometheus provider uses, so existing dashboards
// work) from two interceptors, rather than a further dependency.
type grpcMetrics struct {
	started  *prometheus.CounterVec
	handled  *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newGRPCMetrics(reg prometheus.Registerer) *grpcMetrics {
	labels := []string{"grpc_type", "grpc_service", "grpc_method"}
	m := &grpcMetrics{
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_started_total", Help: "RPCs started on the server.",
		}, labels),
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_handled_total", Help: "RPCs completed on the server, by status code.",
		}, append(labels, "grpc_code")),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "grpc_server_handling_seconds", Help: "Time to handle a unary RPC.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, labels),
	}
	reg.MustRegister(m.started, m.handled, m.duration)
	return m
}

func splitMethod(full string) (string, string) {
	full = strings.TrimPrefix(full, "/")
	if i := strings.LastIndex(full, "/"); i >= 0 {
		return full[:i], full[i+1:]
	}
	return "unknown", full
}

func (m *grpcMetrics) options() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			svc, meth := splitMethod(info.FullMethod)
			m.started.WithLabelValues("unary", svc, meth).Inc()
			t0 := time.Now()
			resp, err := h(ctx, req)
			m.duration.WithLabelValues("unary", svc, meth).Observe(time.Since(t0).Seconds())
			m.handled.WithLabelValues("unary", svc, meth, status.Code(err).String()).Inc()
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			svc, meth := splitMethod(info.FullMethod)
			typ := "bidi_stream"
			if !info.IsClientStream {
				typ = "server_stream"
			}
			m.started.WithLabelValues(typ, svc, meth).Inc()
			err := h(srv, ss)
			m.handled.WithLabelValues(typ, svc, meth, status.Code(err).String()).Inc()
			return err
		}),
	}
}
