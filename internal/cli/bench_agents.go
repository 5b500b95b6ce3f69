package cli

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/internal/bench"
)

func newBenchAgentsCmd() *cobra.Command {
	var cfg bench.AgentsConfig
	var output string
	cmd := &cobra.Command{
		Use:   "agents",
		Short: "Simulate many node agents on the agent API: cold start, server memory per agent, bundle fan-out",
		Long: `Simulate --agents node agents in this one process, each speaking the agent
API as 'meshid agent' does: Attest with an agent join token, then, over mTLS
with its node SVID, one Sync stream and SignX509SVIDs batches.

Set-up (not timed), through the admin API on --admin-socket: an agent join
token per agent (node <prefix>-<i>) and --workloads entries per agent, each
with that agent as --parent-id (so each agent is entitled to exactly its
own), or with --shared --workloads entries every agent may serve. Keys and
CSRs are made before the clock unless --keygen-inline.

Timed:
  cold start  every agent attests, opens Sync, waits for all its entries
              and signs one CSR per entry in one SignX509SVIDs batch, at
              most --concurrency agents at once; reported: the time until
              all agents x workloads SVIDs are issued, agents/s, SVIDs/s.
  memory      with --metrics-url the server's RSS, heap and goroutines are
              scraped before the agents connect and once all hold their
              streams (and at the end), divided by the agents.
  fan-out     --fanout revoke (default: one of the run's SVIDs is revoked;
              the CRLs, so the bundle, change) or prepare (a new CA): the
              time from the admin call until each agent's stream delivers
              the new bundle version, p50/p99/max.

Every SVID issued is then looked up in the inventory. The streams are
closed at the end. Entries and agent records stay on the server; each run
uses fresh node names (a random prefix unless --node-prefix).`,
		Example: `  meshid bench agents --server 127.0.0.1:8444 --admin-socket /run/meshid/admin/admin.sock \
      --agents 1000 --workloads 10 --metrics-url http://127.0.0.1:9090/metrics`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			switch {
			case cfg.Server == "":
				return errors.New("--server (the agent API, host:port) is required")
			case cfg.Agents <= 0 || cfg.Workloads <= 0:
				return fmt.Errorf("--agents and --workloads must be positive (got %d and %d)", cfg.Agents, cfg.Workloads)
			case cfg.Concurrency <= 0:
				return fmt.Errorf("--concurrency must be positive (got %d)", cfg.Concurrency)
			}
			switch cfg.Fanout {
			case bench.FanoutRevoke, bench.FanoutPrepare, bench.FanoutNone:
			default:
				return fmt.Errorf("--fanout %q: want revoke, prepare or none", cfg.Fanout)
			}
			// The socket must be there before any set-up starts.
			_, closeAdmin, err := dialAdmin(cfg.AdminSocket)
			if err != nil {
				return err
			}
			closeAdmin()
			errw := cmd.ErrOrStderr()
			cfg.Progress = func(line string) { fmt.Fprintf(errw, "\r\033[K%s", line) }
			res, err := bench.Agents(cmd.Context(), cfg)
			fmt.Fprintln(errw)
			if err != nil {
				return err
			}
			if structured(output) {
				if err := writeOut(cmd.OutOrStdout(), output, res); err != nil {
					return err
				}
			} else {
				printAgentsResult(cmd.OutOrStdout(), res)
			}
			switch {
			case res.Errors > 0:
				return fmt.Errorf("%d errors (first: %s)", res.Errors, res.FirstError)
			case res.ColdStart.Ready < res.Agents:
				return fmt.Errorf("only %d of %d agents had all their SVIDs within %s", res.ColdStart.Ready, res.Agents, cfg.Timeout)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&cfg.Server, "server", "", "agent API of the server under test, host:port (meshid server --agent-listen)")
	fs.StringVar(&cfg.AdminSocket, "admin-socket", endpoint.DefaultLayout().AdminSocket, "admin API socket of the server under test (set-up and fan-out)")
	fs.StringVar(&cfg.MetricsURL, "metrics-url", "", "the server's /metrics, to report RSS, heap and goroutines per connected agent")
	fs.IntVar(&cfg.Agents, "agents", 100, "node agents to simulate")
	fs.IntVar(&cfg.Workloads, "workloads", 10, "entries each agent is entitled to (and SVIDs it signs)")
	fs.BoolVar(&cfg.Shared, "shared", false, "make --workloads entries without a parent, shared by every agent, instead of --workloads per agent")
	fs.IntVarP(&cfg.Concurrency, "concurrency", "c", 64, "agents in their cold start (attest to last SVID) at once")
	fs.IntVar(&cfg.SetupConcurrency, "setup-concurrency", 16, "admin calls of the set-up at once")
	fs.StringVar(&cfg.NodePrefix, "node-prefix", "", "agents are nodes <prefix>-<i> (default bench-<random>)")
	fs.StringVar(&cfg.Fanout, "fanout", bench.FanoutRevoke, "bundle change timed once all agents are up: revoke (one of the run's SVIDs), prepare (a new CA) or none")
	durationFlag(fs, &cfg.Timeout, "timeout", 2*time.Minute, "bound of the cold start and, apart, of the fan-out")
	durationFlag(fs, &cfg.Hold, "hold", 0, "keep the streams open this long after the fan-out, before the last scrape")
	fs.BoolVar(&cfg.KeygenInline, "keygen-inline", false, "make each agent's keys and CSRs on the clock, in its cold start")
	fs.BoolVar(&cfg.VerifyInventory, "verify-inventory", true, "check afterwards that every SVID issued is in the inventory, for its entry")
	outputFlag(fs, &output)
	return cmd
}

func printAgentsResult(w io.Writer, res bench.AgentsResult) {
	ms := func(d time.Duration) string { return d.Round(10 * time.Microsecond).String() }
	lat := func(l bench.Latency) string {
		return fmt.Sprintf("p50 %s  p99 %s  max %s  (n=%d)", ms(l.P50), ms(l.P99), ms(l.Max), l.Count)
	}
	cs := res.ColdStart
	fmt.Fprintf(w, "set-up           %d agent tokens and %d entries (%s) in %s; keys made before the clock in %s\n",
		res.Agents, res.Entries, res.Mode, res.Setup.Round(time.Millisecond), res.KeyPrep.Round(time.Millisecond))
	fmt.Fprintf(w, "cold start       %d agents x %d workloads: %d SVIDs in %s (%.0f agents/s, %.0f SVIDs/s); attested %d, synced %d, ready %d\n",
		res.Agents, res.Workloads, cs.SVIDs, cs.Elapsed.Round(time.Millisecond), cs.AgentsPerSecond, cs.SVIDsPerSecond, cs.Attested, cs.Synced, cs.Ready)
	fmt.Fprintf(w, "  attest         %s\n", lat(cs.Attest))
	fmt.Fprintf(w, "  sync           %s\n", lat(cs.Sync))
	fmt.Fprintf(w, "  sign batch     %s\n", lat(cs.Sign))
	fmt.Fprintf(w, "  per agent      %s\n", lat(cs.Total))
	if m := res.Metrics; m != nil {
		kib := func(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }
		mib := func(b float64) string { return fmt.Sprintf("%.1f MiB", b/(1<<20)) }
		fmt.Fprintf(w, "server           RSS %s -> %s -> %s  heap %s -> %s -> %s  goroutines %.0f -> %.0f -> %.0f  (before / all up / end)\n",
			mib(m.Before.RSSBytes), mib(m.Up.RSSBytes), mib(m.End.RSSBytes),
			mib(m.Before.HeapInuseBytes), mib(m.Up.HeapInuseBytes), mib(m.End.HeapInuseBytes),
			m.Before.Goroutines, m.Up.Goroutines, m.End.Goroutines)
		fmt.Fprintf(w, "per agent (up)   RSS %s  heap %s  stacks %s  goroutines %.2f\n", kib(m.PerAgentUp.RSSBytes), kib(m.PerAgentUp.HeapInuseBytes), kib(m.PerAgentUp.StackInuse), m.PerAgentUp.Goroutines)
		fmt.Fprintf(w, "per agent (end)  RSS %s  heap %s  stacks %s  goroutines %.2f\n", kib(m.PerAgentEnd.RSSBytes), kib(m.PerAgentEnd.HeapInuseBytes), kib(m.PerAgentEnd.StackInuse), m.PerAgentEnd.Goroutines)
	}
	if f := res.Fanout; f != nil {
		what := "a new CA"
		if f.Trigger == bench.FanoutRevoke {
			what = "serial " + f.Serial + " on the CRL"
		}
		fmt.Fprintf(w, "fan-out          %s: call %s; new bundle at %d of %d agents (%d carrying %s)\n", f.Trigger, ms(f.Call), f.Got, f.Targets, f.Checked, what)
		fmt.Fprintf(w, "  from return    %s\n", lat(f.FromReturn))
		fmt.Fprintf(w, "  from start     %s\n", lat(f.FromStart))
	}
	if res.ForeignEntries > 0 {
		fmt.Fprintf(w, "foreign entries  %d sent to the agents that this run did not make (not signed)\n", res.ForeignEntries)
	}
	if res.InventoryChecked > 0 {
		fmt.Fprintf(w, "inventory        all %d SVIDs recorded for their entries\n", res.InventoryChecked)
	}
	fmt.Fprintf(w, "errors           %d\n", res.Errors)
	if res.FirstError != "" {
		fmt.Fprintf(w, "first error: %s\n", res.FirstError)
	}
}
