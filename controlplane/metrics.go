package controlplane

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the server's Prometheus metrics, on a registry of their own
// (never the global default) so that tests and several servers in one
// process do not collide.
type Metrics struct {
	Registry    *prometheus.Registry
	Issued      *prometheus.CounterVec
	IssueErrors prometheus.Counter
	// RenewalFailures counts failed attempts to renew a served SVID.
	RenewalFailures prometheus.Counter
	// RotationFailures counts CA lifecycle steps that failed (retried).
	RotationFailures prometheus.Counter
}

// NewMetrics creates the metrics and registers them with Go runtime and
// process collectors.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_svid_issued_total",
			Help: "SVIDs issued, by kind (x509, jwt).",
		}, []string{"kind"}),
		IssueErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshid_svid_issue_errors_total",
			Help: "Requests for an SVID that failed, for any reason.",
		}),
		RenewalFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshid_renewal_failures_total",
			Help: "Failed attempts to renew an SVID held by a connected workload; each is retried with backoff.",
		}),
	}
	m.RotationFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshid_ca_rotation_failures_total",
		Help: "CA lifecycle steps (prepare, activate) that failed; each is retried.",
	})
	m.Registry.MustRegister(m.Issued, m.IssueErrors, m.RenewalFailures, m.RotationFailures,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.Issued.WithLabelValues("x509")
	return m
}
