package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/internal/bench"
)

func newBenchCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Load-test a running server through its real APIs"}
	cmd.AddCommand(newBenchMintCmd(), newBenchSDSCmd(), newBenchAgentsCmd())
	return cmd
}

func newBenchMintCmd() *cobra.Command {
	var cfg bench.MintConfig
	var output string
	cmd := &cobra.Command{
		Use:   "mint",
		Short: "Mint SVIDs from CSRs through the admin API and report SVIDs/s and latency",
		Long: `Mint SVIDs from CSRs through the admin API with -c concurrent clients (one
connection each) and report SVIDs/s and p50/p99 latency. CSRs are prepared
before the clock starts unless --keygen-inline; afterwards every serial
received is looked up in the server's inventory.`,
		Example: `  meshid bench mint --admin-socket /run/meshid/admin/admin.sock -c 8 -n 50000`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if len(cfg.AdminSockets) == 1 {
				cfg.AdminSocket, cfg.AdminSockets = cfg.AdminSockets[0], nil
			}
			for _, sock := range append([]string{cfg.AdminSocket}, cfg.AdminSockets...) {
				if sock == "" {
					continue
				}
				if _, _, err := dialAdmin(sock); err != nil {
					return err
				}
			}
			if output == "table" {
				cfg.Progress = func(done int) { fmt.Fprintf(cmd.ErrOrStderr(), "\r%d/%d", done, cfg.Requests) }
			}
			res, err := bench.Mint(cmd.Context(), cfg)
			if output == "table" {
				fmt.Fprintln(cmd.ErrOrStderr())
			}
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOut(cmd.OutOrStdout(), output, res)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "minted     %d SVIDs in %s with %d clients (%d errors)\n", res.Requests-res.Errors, res.Elapsed.Round(time.Millisecond), cfg.Concurrency, res.Errors)
			fmt.Fprintf(w, "throughput %.0f SVIDs/s\n", res.PerSecond)
			fmt.Fprintf(w, "latency    p50 %s  p99 %s  max %s\n", res.P50.Round(time.Microsecond), res.P99.Round(time.Microsecond), res.Max.Round(time.Microsecond))
			if res.CSRPrep > 0 {
				fmt.Fprintf(w, "csr prep   %s (before the clock)\n", res.CSRPrep.Round(time.Millisecond))
			}
			if cfg.VerifyInventory {
				fmt.Fprintf(w, "inventory  all %d serials recorded, %d duplicates\n", res.InventoryChecked, res.Duplicates)
			}
			if res.Failovers > 0 {
				fmt.Fprintf(w, "failovers  %d (clients moved to another replica)\n", res.Failovers)
			}
			if res.FirstError != "" {
				fmt.Fprintf(w, "first error: %s\n", res.FirstError)
			}
			if res.Errors > 0 {
				return fmt.Errorf("%d of %d requests failed", res.Errors, res.Requests)
			}
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&cfg.AdminSockets, "admin-socket", []string{endpoint.DefaultLayout().AdminSocket}, "admin API socket of the server under test; a comma-separated list spreads the clients over replicas (--store etcd), each moving to the next replica on Unavailable")
	fs.StringVar(&cfg.SpiffeID, "spiffe-id", "spiffe://cluster.local/ns/bench/sa/load", "SPIFFE ID to mint")
	fs.IntVarP(&cfg.Concurrency, "concurrency", "c", 8, "concurrent clients")
	fs.IntVarP(&cfg.Requests, "requests", "n", 10000, "SVIDs to mint")
	fs.BoolVar(&cfg.KeygenInline, "keygen-inline", false, "make each key and CSR on the clock, per request")
	fs.BoolVar(&cfg.VerifyInventory, "verify-inventory", true, "check afterwards that every serial received is in the inventory")
	outputFlag(fs, &output)
	return cmd
}
