package controlplane

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/meshid/ca"
)

// applyFastSign turns on the CA package's fast SVID signing for a when
// Config.FastSign asks for it. A CA that does not qualify (RSA) or whose
// canary fails keeps signing with x509.CreateCertificate, with a warning.
func (s *Server) applyFastSign(a *ca.Authority) {
	if !s.cfg.FastSign {
		return
	}
	failures := s.fastSignFailures()
	err := a.EnableFastSign(ca.FastSignOptions{
		Logger:         s.log,
		OnCheckFailure: func(error) { failures.Inc() },
	})
	if err != nil {
		s.log.Warn("fast SVID signing not enabled for this CA; signing with x509.CreateCertificate",
			"ca", ca.Fingerprint(a.Cert), "error", err)
	}
}

// fastSignFailures is the counter of failed fast-signing checks, registered
// on first use; later calls get the registered one.
func (s *Server) fastSignFailures() prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshid_fast_sign_check_failures_total",
		Help: "Fast SVID signing checks (load canary, sampled post-sign verify) that failed; each turns fast signing off for that CA.",
	})
	if err := s.metrics.Registry.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(prometheus.Counter); ok {
				return existing
			}
		}
		s.log.Warn("register fast-sign metric", "error", err)
	}
	return c
}
