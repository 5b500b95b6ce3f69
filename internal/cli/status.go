package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newStatusCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the store and its replicas (which one leads, etcd health) and the node agents' bundle convergence",
		Long: `Show the state store: its backend and revision, and with --store etcd every
replica sharing it, which one leads the CA lifecycle, and each etcd member's
health. A store that cannot make writes durable (no etcd quorum) says why:
writes are refused with Unavailable until it recovers.

Then show, for every node agent connected to this server, how many of its
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
			if err := printStoreStatus(out, resp.GetStore()); err != nil {
				return err
			}
			prepared := resp.GetPreparedCa() != ""
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			withReplica := false
			for _, a := range resp.GetAgents() {
				withReplica = withReplica || a.GetReplica() != ""
			}
			header := "AGENT\tSTREAMS\tON NEWEST BUNDLE"
			if withReplica {
				header = "AGENT\tREPLICA\tSTREAMS\tON NEWEST BUNDLE"
			}
			if prepared {
				header += "\tHOLD PREPARED CA"
			}
			fmt.Fprintln(tw, header)
			for _, a := range resp.GetAgents() {
				streams := fmt.Sprint(a.GetStreams())
				if !a.GetReported() {
					streams = "(no report yet)"
				}
				id := a.GetId()
				if withReplica {
					id += "\t" + a.GetReplica()
				}
				line := fmt.Sprintf("%s\t%s\t%d", id, streams, a.GetStreamsNewest())
				if prepared {
					line += fmt.Sprintf("\t%d", a.GetStreamsPrepared())
				}
				fmt.Fprintln(tw, line)
			}
			total := fmt.Sprintf("TOTAL (%d agents)\t%d\t%d", len(resp.GetAgents()), resp.GetStreams(), resp.GetStreamsNewest())
			if withReplica {
				total = fmt.Sprintf("TOTAL (%d agents)\t\t%d\t%d", len(resp.GetAgents()), resp.GetStreams(), resp.GetStreamsNewest())
			}
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

// printStoreStatus writes the store part of meshid status.
func printStoreStatus(out io.Writer, st *adminv1.StoreStatus) error {
	if st == nil {
		return nil
	}
	leader := st.GetLeader()
	if leader == "" {
		leader = "(none)"
	}
	fmt.Fprintf(out, "store %s at revision %d; leader %s; answered by %s\n", st.GetBackend(), st.GetRevision(), leader, st.GetReplica())
	if h := st.GetHealth(); h != "" {
		fmt.Fprintf(out, "store UNAVAILABLE for writes: %s\n", h)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REPLICA\tROLE\tVERSION\tSTARTED\tADDRESSES")
	for _, r := range st.GetReplicas() {
		role := "follower"
		if r.GetId() == st.GetLeader() {
			role = "leader"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.GetId(), role, r.GetVersion(), r.GetStartedAt().AsTime().UTC().Format(time.RFC3339), strings.Join(r.GetAddresses(), " "))
	}
	if ms := st.GetEtcdMembers(); len(ms) > 0 {
		fmt.Fprintln(tw, "")
		fmt.Fprintln(tw, "ETCD MEMBER\tENDPOINT\tHEALTH\tRAFT\tREVISION\tDB SIZE")
		for _, m := range ms {
			health, raft := "healthy", "follower"
			if !m.GetHealthy() {
				health = "UNHEALTHY: " + m.GetError()
			}
			if m.GetLeader() {
				raft = "leader"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", m.GetName(), m.GetEndpoint(), health, raft, m.GetRevision(), m.GetDbSizeBytes())
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out)
	return nil
}
