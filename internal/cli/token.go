package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Join tokens: for proxies that reach SDS over TCP, and for node agents"}
	var (
		admin, spiffeID, output, nodeID string
		ttl                             time.Duration
		singleUse, agent                bool
	)
	create := &cobra.Command{
		Use:   "create (--spiffe-id ID [--single-use] | --agent [--node-id NODE]) --ttl 1h",
		Short: "Make a join token: for a proxy on SDS over TCP (--spiffe-id) or a node agent's first attestation (--agent)",
		Long: `Make a join token granting --spiffe-id to a proxy that connects to the
server's TCP SDS endpoint (--sds-listen or --sds-rest-listen) without an SVID
yet. Envoy sends it as gRPC initial metadata:

  grpc_services:
  - envoy_grpc: {cluster_name: meshid_sds}
    initial_metadata:
    - {key: authorization, value: "Bearer <token>"}

The secret is printed once; the server keeps only its hash. A single-use
token is bound to the first connection that presents it.

With --agent the token attests a node agent instead (meshid agent
--join-token): it is single-use and makes the agent
spiffe://<trust domain>/meshid/agent/join/<node-id>, which then renews its
node SVID itself and restarts from its --data-dir without a new token. Pass
that ID to 'meshid entry create --parent-id' to have only this agent serve
an entry. An agent token is refused on SDS, and a workload token by the
agent API, without being spent.`,
		Example: `  meshid token create --spiffe-id spiffe://cluster.local/ns/shop/sa/web --single-use --ttl 1h
  meshid token create --agent --node-id web-1 --ttl 1h > web-1.token
  meshid agent --server meshid.example:8443 --join-token-file web-1.token --trust-bundle bundle.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if agent == (spiffeID != "") {
				return fmt.Errorf("give --spiffe-id (a workload token) or --agent (a node agent token)")
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.CreateJoinToken, &adminv1.CreateJoinTokenRequest{
				SpiffeId: spiffeID, Ttl: durationpb.New(ttl), SingleUse: singleUse, Agent: agent, NodeId: nodeID})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp)
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.GetToken())
			fmt.Fprintf(cmd.ErrOrStderr(), "join token for %s, valid until %s (shown once)\n", resp.GetSpiffeId(), resp.GetExpiresAt().AsTime().Format(time.RFC3339))
			return nil
		},
	}
	adminFlag(create, &admin)
	fs := create.Flags()
	fs.StringVar(&spiffeID, "spiffe-id", "", "identity the token grants (a workload token)")
	fs.BoolVar(&agent, "agent", false, "make a token that attests a node agent (single-use)")
	fs.StringVar(&nodeID, "node-id", "", "with --agent: the node's name in its agent ID (default: random)")
	durationFlag(fs, &ttl, "ttl", time.Hour, "how long the token can be redeemed (max 30d)")
	fs.BoolVar(&singleUse, "single-use", false, "bind the token to the first connection that presents it")
	outputFlag(fs, &output)
	cmd.AddCommand(create)
	return cmd
}
