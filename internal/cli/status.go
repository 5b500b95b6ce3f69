package cli

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newStatusCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the node agents' bundle convergence: per agent, streams and how many hold the newest bundle",
		Long: `Show, for every node agent connected to this server, how many of its
callers' streams carry the trust bundle (SDS streams asking for it, Workload
API X.509 watchers) and how many hold the newest bundle (SDS: have ACKed it),
and, while a CA is prepared, how many hold a bundle with it. Automatic
activation of the prepared CA waits until that fraction reaches
--ca-activate-min-convergence; the last line says so while it waits.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.Status, &adminv1.StatusRequest{})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp)
			}
			out := cmd.OutOrStdout()
			prepared := resp.GetPreparedCa() != ""
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			header := "AGENT\tSTREAMS\tON NEWEST BUNDLE"
			if prepared {
				header += "\tHOLD PREPARED CA"
			}
			fmt.Fprintln(tw, header)
			for _, a := range resp.GetAgents() {
				streams := fmt.Sprint(a.GetStreams())
				if !a.GetReported() {
					streams = "(no report yet)"
				}
				line := fmt.Sprintf("%s\t%s\t%d", a.GetId(), streams, a.GetStreamsNewest())
				if prepared {
					line += fmt.Sprintf("\t%d", a.GetStreamsPrepared())
				}
				fmt.Fprintln(tw, line)
			}
			total := fmt.Sprintf("TOTAL (%d agents)\t%d\t%d", len(resp.GetAgents()), resp.GetStreams(), resp.GetStreamsNewest())
			if prepared {
				total += fmt.Sprintf("\t%d", resp.GetStreamsPrepared())
			}
			fmt.Fprintln(tw, total)
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(out, "newest bundle %s; convergence %.1f%%\n", resp.GetBundleVersion(), 100*resp.GetConvergenceRatio())
			if h := resp.GetActivationHeld(); h != "" {
				fmt.Fprintf(out, "prepared CA %s: %s\n", resp.GetPreparedCa(), h)
			}
			return nil
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}
