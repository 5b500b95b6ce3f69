package controlplane

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshid/meshid/endpoint"
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
	// MintFailures counts failed mints of SVIDs served to connected
	// callers, by reason (invalid, busy, canceled, other); each is retried.
	MintFailures *prometheus.CounterVec
	// RotationFailures counts CA lifecycle steps that failed (retried).
	RotationFailures prometheus.Counter
	// WorkloadStreams counts open SPIFFE Workload API streams.
	WorkloadStreams prometheus.Gauge
	// SignWait is the time requests queued for the signing limits.
	SignWait prometheus.Histogram
	// Conns are the connection limits' open and refused counts.
	Conns *endpoint.ConnMetrics
	// CRLSetsSigned counts the CRL sets this server signed, by its role
	// then: the leader's are served by every replica; a follower signs its
	// own only when the leader's did not come (crlset.go).
	CRLSetsSigned *prometheus.CounterVec
	// CRLStoreFailures counts the leader's failed writes of its CRL set.
	CRLStoreFailures prometheus.Counter
	// CRLNumber is the CRL number of the set this server serves.
	CRLNumber prometheus.Gauge
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
	m.MintFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshid_svid_mint_failures_total",
		Help: "Failed mints of SVIDs served to connected workloads (first issue or renewal), by reason: invalid (the entry cannot be signed), busy, canceled, other. Each is retried with backoff; the caller keeps its other identities and the bundle.",
	}, []string{"reason"})
	m.SignWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "meshid_sign_wait_seconds",
		Help:    "Time an SVID request waited for the signing rate and concurrency limits.",
		Buckets: []float64{0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
	})
	m.WorkloadStreams = prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshid_workload_streams", Help: "Open SPIFFE Workload API streams."})
	m.CRLSetsSigned = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshid_crl_sets_signed_total",
		Help: "CRL sets this server signed, by its role then (leader, follower). Every replica serves the leader's; a follower signs its own only when the leader's set did not come within a second of a change, so replicas then serve different bytes and bundle versions.",
	}, []string{"role"})
	m.CRLStoreFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshid_crl_store_failures_total",
		Help: "Failed writes of the leader's CRL set to the store (retried with backoff; the followers sign their own meanwhile).",
	})
	m.CRLNumber = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshid_crl_number",
		Help: "The CRL number of the CRL set this server serves; replicas serving the leader's set report the same.",
	})
	m.Registry.MustRegister(m.Issued, m.IssueErrors, m.RenewalFailures, m.MintFailures, m.RotationFailures, m.SignWait, m.WorkloadStreams,
		m.CRLSetsSigned, m.CRLStoreFailures, m.CRLNumber,
		newBuildInfo(),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.Issued.WithLabelValues("x509")
	m.Conns = endpoint.NewConnMetrics(m.Registry)
	// Every reason from zero, so increase() sees the first failure.
	for _, r := range []string{"invalid", "busy", "canceled", "other"} {
		m.MintFailures.WithLabelValues(r)
	}
	m.CRLSetsSigned.WithLabelValues("leader")
	m.CRLSetsSigned.WithLabelValues("follower")
	return m
}

// stateCollector reports, at scrape time, what is derived from live state:
// CA expiries by state, the earliest expiry among served SVIDs, SVIDs past
// their renewal point, and the configured SVID TTL.
type stateCollector struct {
	srv      *Server
	caExpiry *prometheus.Desc
	earliest *prometheus.Desc
	overdue  *prometheus.Desc
	ttl      *prometheus.Desc
	served   *prometheus.Desc
	revoked  *prometheus.Desc
	writable *prometheus.Desc
}

func newStateCollector(s *Server) *stateCollector {
	return &stateCollector{
		srv: s,
		caExpiry: prometheus.NewDesc("meshid_ca_expiry_timestamp_seconds",
			"When each CA in the trust bundle expires (unix seconds), by kind (x509, jwt) and state.", []string{"ca", "kind", "state"}, nil),
		earliest: prometheus.NewDesc("meshid_svid_earliest_expiry_timestamp_seconds",
			"The soonest NotAfter among SVIDs served to connected workloads (unix seconds); 0 when none is served.", nil, nil),
		overdue: prometheus.NewDesc("meshid_svid_renewals_overdue",
			"Served SVIDs whose renewal point (half-life with jitter, per SVID) has passed by more than a minute without a renewal.", nil, nil),
		ttl: prometheus.NewDesc("meshid_svid_ttl_seconds", "The default X.509-SVID lifetime (--svid-ttl).", nil, nil),
		revoked: prometheus.NewDesc("meshid_revoked_serials",
			"Serials on the CRLs: revoked and not yet expired.", nil, nil),
		writable: prometheus.NewDesc("meshid_store_writable",
			"1 while the store accepts writes; 0 after a failed commit (full disk: back to 1 once space is freed; other I/O errors: until restart).", nil, nil),
		served: prometheus.NewDesc("meshid_svids_served",
			"X.509-SVIDs currently held for connected workloads (one per identity, shared by its streams).", nil, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.caExpiry
	ch <- c.earliest
	ch <- c.overdue
	ch <- c.ttl
	ch <- c.served
	ch <- c.revoked
	ch <- c.writable
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.srv
	now := s.now()
	s.mu.RLock()
	for _, v := range s.cas {
		if v.inBundle(now) {
			ch <- prometheus.MustNewConstMetric(c.caExpiry, prometheus.GaugeValue, float64(v.cert.NotAfter.Unix()), v.rec.ID[:16], "x509", string(v.rec.State))
		}
	}
	for _, v := range s.jwtKeys {
		if now.Before(v.rec.NotAfter) {
			ch <- prometheus.MustNewConstMetric(c.caExpiry, prometheus.GaugeValue, float64(v.rec.NotAfter.Unix()), v.rec.ID, "jwt", string(v.rec.State))
		}
	}
	revoked := s.revoked.Len()
	s.mu.RUnlock()
	ch <- prometheus.MustNewConstMetric(c.revoked, prometheus.GaugeValue, float64(revoked))
	earliest, overdue, served := s.ids.Stats(now)
	e := 0.0
	if !earliest.IsZero() {
		e = float64(earliest.Unix())
	}
	ch <- prometheus.MustNewConstMetric(c.earliest, prometheus.GaugeValue, e)
	ch <- prometheus.MustNewConstMetric(c.overdue, prometheus.GaugeValue, float64(overdue))
	ch <- prometheus.MustNewConstMetric(c.ttl, prometheus.GaugeValue, s.cfg.SVIDTTL.Seconds())
	ch <- prometheus.MustNewConstMetric(c.served, prometheus.GaugeValue, float64(served))
	writable := 1.0
	if s.store.Health() != nil {
		writable = 0
	}
	ch <- prometheus.MustNewConstMetric(c.writable, prometheus.GaugeValue, writable)
}
