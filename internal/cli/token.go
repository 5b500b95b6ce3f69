package cli

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Join tokens for proxies that reach SDS over TCP"}
	var (
		admin, spiffeID, output string
		ttl                     time.Duration
		singleUse               bool
	)
	create := &cobra.Command{
		Use:   "create --spiffe-id ID --ttl 1h [--single-use]",
		Short: "Make a join token: a bearer credential for SDS over TCP (--sds-listen)",
		Long: `Make a join token granting --spiffe-id to a proxy that connects to the
server's TCP SDS endpoint (--sds-listen or --sds-rest-listen) without an SVID
yet. Envoy sends it as gRPC initial metadata:

  grpc_services:
  - envoy_grpc: {cluster_name: meshid_sds}
    initial_metadata:
    - {key: authorization, value: "Bearer <token>"}

The secret is printed once; the server keeps only its hash. A single-use
token is bound to the first connection that presents it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.CreateJoinToken, &adminv1.CreateJoinTokenRequest{SpiffeId: spiffeID, Ttl: durationpb.New(ttl), SingleUse: singleUse})
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
	fs.StringVar(&spiffeID, "spiffe-id", "", "identity the token grants (required)")
	durationFlag(fs, &ttl, "ttl", time.Hour, "how long the token can be redeemed (max 30d)")
	fs.BoolVar(&singleUse, "single-use", false, "bind the token to the first connection that presents it")
	outputFlag(fs, &output)
	_ = create.MarkFlagRequired("spiffe-id")
	cmd.AddCommand(create)
	return cmd
}
