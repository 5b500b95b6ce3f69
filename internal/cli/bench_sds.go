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

func newBenchSDSCmd() *cobra.Command {
	var cfg bench.SDSConfig
	var output string
	cmd := &cobra.Command{
		Use:   "sds",
		Short: "Hold many Envoy-style SDS streams, push a bundle, or loop connects; report latency and memory",
		Long: `Open --streams StreamSecrets streams on the workload socket exactly as Envoy
does (a first request with node and one resource name, every response
ACKed with its version and nonce; one stream per secret name), spread over
--conns gRPC connections (default: one per stream, as when every Envoy is
its own process). Streams ask for the --names in turn.

Reported: time from opening each stream to its first secret (p50/p99),
responses pushed afterwards, NACKs sent (only with --nack-every) and
errors. With --metrics-url the server's RSS, heap in use and goroutines
are scraped before the streams open, once all have their first secret and
at the end, and the growth is divided by the streams.

--push calls the admin API's PrepareCA once every stream is up (a new CA
in the trust bundle) and measures, for the bundle streams (ROOTCA, ALL,
spiffe://<trust domain>), the time from the call until each stream has
received and ACKed the new bundle.

--connect-loop runs --clients goroutines each looping {connect, open a
stream for default, first secret, close} for --duration.

The run lasts --duration: streams stay open (idle, ACKing) until it ends.
Run it in a process of its own, away from the server: each connection is a
file descriptor on both sides.`,
		Example: `  meshid bench sds --socket /run/meshid/workload/workload.sock --streams 10000 --conns 100 \
      --names ROOTCA --duration 60s --metrics-url http://127.0.0.1:9090/metrics
  meshid bench sds --streams 10000 --names ROOTCA --push --duration 90s
  meshid bench sds --connect-loop --clients 500 --duration 20s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if cfg.Push {
				if _, _, err := dialAdmin(cfg.AdminSocket); err != nil {
					return err
				}
			}
			if cfg.Push && cfg.ConnectLoop {
				return errors.New("--push and --connect-loop do not go together")
			}
			if err := applySpiffeEndpointSocket(cmd.Flags(), "socket"); err != nil {
				return err
			}
			errw := cmd.ErrOrStderr()
			cfg.Progress = func(line string) { fmt.Fprintf(errw, "\r\033[K%s", line) }
			res, err := bench.SDS(cmd.Context(), cfg)
			fmt.Fprintln(errw)
			if err != nil {
				return err
			}
			if structured(output) {
				if err := writeOut(cmd.OutOrStdout(), output, res); err != nil {
					return err
				}
			} else {
				printSDSResult(cmd.OutOrStdout(), res)
			}
			switch {
			case res.Errors > 0:
				return fmt.Errorf("%d errors (first: %s)", res.Errors, res.FirstError)
			case res.Loop != nil && res.Loop.Iterations == 0:
				return fmt.Errorf("no first secret in %s: is this process entitled to default?", cfg.Duration)
			case res.Mode == "streams" && res.Ready < res.Streams:
				return fmt.Errorf("only %d of %d streams got a first secret within %s", res.Ready, res.Streams, cfg.Duration)
			case res.Push != nil && res.Push.Got < res.Push.Targets:
				return fmt.Errorf("only %d of %d bundle streams got the new bundle within %s", res.Push.Got, res.Push.Targets, cfg.Duration)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&cfg.Socket, "socket", endpoint.DefaultLayout().Socket, "workload socket of the server under test")
	fs.IntVar(&cfg.Streams, "streams", 100, "StreamSecrets streams to open and hold")
	fs.IntVar(&cfg.Conns, "conns", 0, "gRPC connections carrying them (0: one per stream)")
	fs.StringSliceVar(&cfg.Names, "names", []string{"default", "ROOTCA"}, "secret names, one per stream, in turn")
	durationFlag(fs, &cfg.Duration, "duration", 30*time.Second, "length of the run: streams are held open until it ends; the connect loop runs for it")
	fs.IntVar(&cfg.Ramp, "ramp", 200, "streams opening (waiting for their first secret) at once")
	fs.BoolVar(&cfg.Push, "push", false, "once all streams are up, PrepareCA and time the new bundle to every bundle stream's ACK")
	fs.StringVar(&cfg.AdminSocket, "admin-socket", endpoint.DefaultLayout().AdminSocket, "admin API socket (for --push)")
	fs.StringVar(&cfg.MetricsURL, "metrics-url", "", "the server's /metrics, to report RSS, heap and goroutines per stream")
	fs.BoolVar(&cfg.ConnectLoop, "connect-loop", false, "loop {connect, first secret of default, close} with --clients clients")
	fs.IntVar(&cfg.Clients, "clients", 500, "clients of --connect-loop")
	fs.Float64Var(&cfg.ConnectRate, "rate", 0, "with --connect-loop: start connects at this fixed rate per second (open loop; latency from each scheduled start) instead of back to back")
	fs.IntVar(&cfg.NackEvery, "nack-every", 0, "NACK every k-th response of each stream (testing; 0: never)")
	outputFlag(fs, &output)
	return cmd
}

func printSDSResult(w io.Writer, res bench.SDSResult) {
	ms := func(d time.Duration) string { return d.Round(10 * time.Microsecond).String() }
	lat := func(l bench.Latency) string {
		return fmt.Sprintf("p50 %s  p99 %s  max %s  (n=%d)", ms(l.P50), ms(l.P99), ms(l.Max), l.Count)
	}
	if res.Loop != nil {
		fmt.Fprintf(w, "connect loop     %d clients, %d connect+first-secret in %s (%.0f/s)\n", res.Loop.Clients, res.Loop.Iterations, res.Elapsed.Round(time.Millisecond), res.Loop.PerSecond)
		fmt.Fprintf(w, "first secret     %s\n", lat(res.Loop.Latency))
		fmt.Fprintf(w, "errors           %d   unfinished at the end %d\n", res.Errors, res.Loop.Unfinished)
	} else {
		fmt.Fprintf(w, "streams          %d up of %d on %d connections, names %v (all up %s after the first open)\n", res.Ready, res.Streams, res.Conns, res.Names, res.RampElapsed.Round(time.Millisecond))
		fmt.Fprintf(w, "first secret     %s\n", lat(res.FirstSecret))
		fmt.Fprintf(w, "pushes           %d   NACKs sent %d   errors %d\n", res.Pushes, res.NACKs, res.Errors)
		if m := res.Metrics; m != nil {
			kib := func(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }
			mib := func(b float64) string { return fmt.Sprintf("%.1f MiB", b/(1<<20)) }
			fmt.Fprintf(w, "server           RSS %s -> %s -> %s  heap %s -> %s -> %s  goroutines %.0f -> %.0f -> %.0f  (before / all up / end)\n",
				mib(m.Before.RSSBytes), mib(m.Up.RSSBytes), mib(m.End.RSSBytes),
				mib(m.Before.HeapInuseBytes), mib(m.Up.HeapInuseBytes), mib(m.End.HeapInuseBytes),
				m.Before.Goroutines, m.Up.Goroutines, m.End.Goroutines)
			fmt.Fprintf(w, "per stream (up)  RSS %s  heap %s  stacks %s  goroutines %.2f\n", kib(m.PerStreamUp.RSSBytes), kib(m.PerStreamUp.HeapInuseBytes), kib(m.PerStreamUp.StackInuse), m.PerStreamUp.Goroutines)
			fmt.Fprintf(w, "per stream (end) RSS %s  heap %s  stacks %s  goroutines %.2f\n", kib(m.PerStreamEnd.RSSBytes), kib(m.PerStreamEnd.HeapInuseBytes), kib(m.PerStreamEnd.StackInuse), m.PerStreamEnd.Goroutines)
		}
		if p := res.Push; p != nil {
			fmt.Fprintf(w, "push             PrepareCA %s; new bundle ACKed by %d of %d bundle streams (%d with one more certificate)\n", ms(p.PrepareCA), p.Got, p.Targets, p.Grew)
			fmt.Fprintf(w, "push to ACK      %s\n", lat(p.ToACK))
		}
	}
	if res.FirstError != "" {
		fmt.Fprintf(w, "first error: %s\n", res.FirstError)
	}
}
