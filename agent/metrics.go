package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// collector exports the agent's state at scrape time, so no value is ever
// stale: meshid_agent_* for the server connection, the last sync, what the
// cache serves, and how long the node would keep every workload valid if
// the server vanished now.
type collector struct {
	a                                        *Agent
	connected, lastSync, served, overdue, ob *prometheus.Desc
	expired, persisted                       *prometheus.Desc
	serverInfo, failovers                    *prometheus.Desc
}

func newCollector(a *Agent) *collector {
	return &collector{a: a,
		connected: prometheus.NewDesc("meshid_agent_connected", "1 while the agent holds its Sync stream to the server, else 0.", nil, nil),
		lastSync:  prometheus.NewDesc("meshid_agent_last_sync_timestamp_seconds", "When the server last pushed a change (or the snapshot) to this agent, unix seconds; 0 before the first.", nil, nil),
		served:    prometheus.NewDesc("meshid_agent_served_svids", "X.509-SVIDs this agent serves to its workloads now.", nil, nil),
		overdue:   prometheus.NewDesc("meshid_agent_overdue_svids", "Served X.509-SVIDs past their renewal time (the server is unreachable or refuses).", nil, nil),
		ob: prometheus.NewDesc("meshid_agent_outage_budget_seconds",
			"How long every workload on this node stays valid if the server vanished now: the earliest expiry among served SVIDs, from now (0 when nothing is served, or once one expired).", nil, nil),
		expired: prometheus.NewDesc("meshid_agent_expired_svids",
			"Identities workloads hold whose SVID expired before it could be renewed: withdrawn (never served expired), so those workloads have none now.", nil, nil),
		persisted: prometheus.NewDesc("meshid_agent_persisted_svids",
			"X.509-SVIDs in the sealed cache in --data-dir: what a restart during a server outage serves before the server is reached. Below meshid_agent_served_svids for long, the cache is not being written (see the log). Absent with --no-persist-cache.", nil, nil),
		serverInfo: prometheus.NewDesc("meshid_agent_server_info",
			"One series per server replica given to --server: 1 for the one the agent holds its Sync stream with, 0 for the others (all 0 while disconnected).", []string{"address"}, nil),
		failovers: prometheus.NewDesc("meshid_agent_server_failovers_total",
			"Times the agent's Sync stream moved to another server replica than the one it last held it with.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.connected, c.lastSync, c.served, c.overdue, c.ob, c.expired, c.persisted, c.serverInfo, c.failovers} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	now := c.a.cfg.Now()
	earliest, overdue, served := c.a.cache.Stats(now)
	conn := 0.0
	if c.a.Connected() {
		conn = 1
	}
	last := 0.0
	if n := c.a.lastSync.Load(); n != 0 {
		last = float64(time.Unix(0, n).Unix())
	}
	budget := 0.0
	expired := c.a.cache.Expired()
	// An identity already withdrawn at its expiry leaves no budget.
	if !earliest.IsZero() && expired == 0 {
		budget = max(earliest.Sub(now).Seconds(), 0)
	}
	ch <- prometheus.MustNewConstMetric(c.connected, prometheus.GaugeValue, conn)
	ch <- prometheus.MustNewConstMetric(c.lastSync, prometheus.GaugeValue, last)
	ch <- prometheus.MustNewConstMetric(c.served, prometheus.GaugeValue, float64(served))
	ch <- prometheus.MustNewConstMetric(c.overdue, prometheus.GaugeValue, float64(overdue))
	ch <- prometheus.MustNewConstMetric(c.ob, prometheus.GaugeValue, budget)
	ch <- prometheus.MustNewConstMetric(c.expired, prometheus.GaugeValue, float64(expired))
	if p := c.a.persist; p != nil {
		ch <- prometheus.MustNewConstMetric(c.persisted, prometheus.GaugeValue, float64(p.saved.Load()))
	}
	current := c.a.Server()
	for _, s := range c.a.ring.servers {
		v := 0.0
		if s == current {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.serverInfo, prometheus.GaugeValue, v, s)
	}
	ch <- prometheus.MustNewConstMetric(c.failovers, prometheus.CounterValue, float64(c.a.Failovers()))
}

// Ready is nil while the agent can serve its node: it has been in touch
// with the server (or holds SVIDs from before), and no SVID it serves has
// expired. A server outage alone does not make it unready: the node's
// workloads are still served.
func (a *Agent) Ready() error {
	now := a.cfg.Now()
	earliest, _, served := a.cache.Stats(now)
	if served > 0 && !now.Before(earliest) {
		return fmt.Errorf("a served SVID expired at %s: the server has been unreachable too long", earliest.UTC().Format(time.RFC3339))
	}
	if n := a.cache.Expired(); n > 0 {
		return fmt.Errorf("%d identities expired before they could be renewed and are withdrawn from their workloads: the server has been unreachable too long", n)
	}
	if served == 0 && a.lastSync.Load() == 0 {
		return errors.New("not yet synced with the server")
	}
	return nil
}

// serveMetrics serves /metrics, /healthz and /readyz on addr until ctx
// ends.
func (a *Agent) serveMetrics(ctx context.Context, l net.Listener) error {
	reg := prometheus.NewRegistry()
	// Process figures too (RSS, open files): an agent's memory per stream
	// is what a node budget is set from.
	reg.MustRegister(newCollector(a), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), collectors.NewGoCollector())
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.Ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		// Which replica, for an operator's curl: the metrics say it too.
		if s := a.Server(); s != "" {
			fmt.Fprintf(w, "ready: connected to server %s\n", s)
		} else {
			fmt.Fprintln(w, "ready: server unreachable, serving from cache")
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
