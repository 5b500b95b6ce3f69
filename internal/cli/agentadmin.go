package cli

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// agentAdminCmds are the `meshid agent` subcommands that manage the node
// agents a server has attested, over its admin socket.
func agentAdminCmds() []*cobra.Command {
	return []*cobra.Command{newAgentListCmd(), newAgentShowCmd(), newAgentEvictCmd(), newAgentBanCmd(), newAgentUnbanCmd()}
}

const agentRefHelp = "ID is the agent's SPIFFE ID (spiffe://<td>/meshid/agent/<method>/<node>) or its node name."

func agentTime(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "-"
	}
	return ts.AsTime().UTC().Format(time.RFC3339)
}

func agentState(a *adminv1.Agent) string {
	if a.GetBanned() {
		return "banned"
	}
	return "active"
}

func writeAgentTable(w io.Writer, all []*adminv1.Agent) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNODE\tMETHOD\tSTATE\tSTREAMS\tSVID EXPIRES\tLAST SEEN")
	for _, a := range all {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", safe(a.GetId()), safe(a.GetNode()), safe(a.GetMethod()), agentState(a),
			a.GetStreams(), agentTime(a.GetSvidExpiresAt()), agentTime(a.GetLastSeen()))
	}
	return tw.Flush()
}

func writeAgentDetail(w io.Writer, a *adminv1.Agent) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "ID\t%s\n", safe(a.GetId()))
	fmt.Fprintf(tw, "NODE\t%s\n", safe(a.GetNode()))
	fmt.Fprintf(tw, "METHOD\t%s\n", safe(a.GetMethod()))
	for _, sel := range a.GetSelectors() {
		fmt.Fprintf(tw, "SELECTOR\t%s\n", safe(sel))
	}
	fmt.Fprintf(tw, "STATE\t%s\n", agentState(a))
	if a.GetBanned() {
		fmt.Fprintf(tw, "BANNED AT\t%s\n", agentTime(a.GetBannedAt()))
	}
	fmt.Fprintf(tw, "STREAMS\t%d\n", a.GetStreams())
	fmt.Fprintf(tw, "FIRST SEEN\t%s\n", agentTime(a.GetFirstSeen()))
	fmt.Fprintf(tw, "LAST SEEN\t%s\n", agentTime(a.GetLastSeen()))
	fmt.Fprintf(tw, "SVID EXPIRES\t%s\n", agentTime(a.GetSvidExpiresAt()))
	return tw.Flush()
}

func newAgentListCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the node agents the server has attested",
		Long: `List every node agent the server has a record of: its node, how it attested,
whether it is banned, how many Sync streams it has open on the server
answering (STREAMS), when its node SVID expires and when it was last seen
(attested, renewed, connected or disconnected).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.ListAgents, &adminv1.ListAgentsRequest{})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutList(cmd.OutOrStdout(), output, resp.GetAgents())
			}
			return writeAgentTable(cmd.OutOrStdout(), resp.GetAgents())
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newAgentShowCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show one node agent",
		Long:  "Show one node agent's record. " + agentRefHelp,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.GetAgent, &adminv1.GetAgentRequest{Id: args[0]})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetAgent())
			}
			return writeAgentDetail(cmd.OutOrStdout(), resp.GetAgent())
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newAgentEvictCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "evict ID",
		Short: "Force a node agent to attest again",
		Long: `Delete a node agent's record: its open streams end and its node SVID is
refused from now on, so it must attest again with a new join token
('meshid token create --agent --node-id NODE'). The SVIDs it already had
signed for its workloads stay valid until they expire; use ban to revoke
them. A banned agent is not evicted (unban it first). ` + agentRefHelp,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.EvictAgent, &adminv1.EvictAgentRequest{Id: args[0]})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp)
			}
			a := resp.GetAgent()
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "evicted %s: %s\n", safe(a.GetId()), reattestHint(a))
			return err
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newAgentBanCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "ban ID",
		Short: "Refuse a node agent and revoke every SVID it obtained",
		Long: `Ban a node agent: it is refused (its streams end, it can neither sign nor
attest again, even with a new token) until 'meshid agent unban', and its node
SVIDs and every live SVID it had signed for workloads go on the CRLs, which
are pushed to every peer with the bundle. Banning a banned agent revokes
again what it holds (to finish a ban whose revocation failed). ` + agentRefHelp,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.BanAgent, &adminv1.BanAgentRequest{Id: args[0]})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "banned %s: %d serial(s) on the CRLs\n", safe(resp.GetAgent().GetId()), len(resp.GetRevokedSerials()))
			return err
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newAgentUnbanCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "unban ID",
		Short: "Let a banned node agent attest again",
		Long: `Lift a ban. The SVIDs revoked with the ban stay revoked: the agent attests
again with a new join token (meshid token create --agent --node-id NODE). ` + agentRefHelp,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.UnbanAgent, &adminv1.UnbanAgentRequest{Id: args[0]})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetAgent())
			}
			a := resp.GetAgent()
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "unbanned %s: %s\n", safe(a.GetId()), reattestHint(a))
			return err
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

// reattestHint says how an evicted or unbanned agent comes back.
func reattestHint(a *adminv1.Agent) string {
	if a.GetMethod() == "k8s_psat" {
		return "it attests again with its service-account token on its next connection"
	}
	return "it attests again with a new join token (meshid token create --agent --node-id " + safe(a.GetNode()) + ")"
}
