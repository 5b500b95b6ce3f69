package cli

import (
	"github.com/spf13/cobra"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/envoyconfig"
)

func newEnvoyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "envoy", Short: "Configure Envoy to take its certificates from meshid"}
	cmd.AddCommand(newEnvoyBootstrapCmd())
	return cmd
}

func newEnvoyBootstrapCmd() *cobra.Command {
	var o envoyconfig.Options
	cmd := &cobra.Command{
		Use:   "bootstrap --spiffe-id ID [--upstream ID=host:port[@localport] ...]",
		Short: "Print an Envoy v3 sidecar bootstrap (YAML) that gets its certificates over SDS",
		Long: `Print a complete Envoy v3 bootstrap, in YAML, for a sidecar whose mTLS
certificates come from meshid over SDS on the unix socket --socket.

The sidecar has:
  - an inbound listener (--listen) that requires a client certificate, presents
    the SDS secret "default" (this workload's X.509-SVID), validates the peer
    with "ROOTCA" (the trust bundle) or, with --validation spiffe, with "ALL"
    (every trust domain's bundle, checked by Envoy's SPIFFE validator), and
    forwards plain TCP to --local-app;
  - for each --upstream SPIFFE-ID=host:port[@localport], a plain-TCP listener
    on 127.0.0.1:localport (from 15001 upward when not given) whose connections
    go out over mTLS to host:port, accepted only if the peer's certificate
    carries exactly that SPIFFE ID as its URI SAN.

SDS secrets use initial_fetch_timeout 0s, so Envoy keeps a listener or cluster
warming until meshid has delivered its certificate instead of serving without
one. meshid knows the caller by the socket's peer credentials: the socket must
be reachable from Envoy's process, and Envoy must run as the user a
registration entry for --spiffe-id names. The bootstrap is validated before it
is printed.`,
		Example: `  meshid envoy bootstrap --spiffe-id spiffe://cluster.local/ns/shop/sa/web \
    --upstream spiffe://cluster.local/ns/shop/sa/db=db.shop.svc:5432 > envoy.yaml
  envoy -c envoy.yaml

  # Envoy's SPIFFE validator with every bundle; the app listens on :3000
  meshid envoy bootstrap --spiffe-id spiffe://cluster.local/ns/shop/sa/web \
    --validation spiffe --local-app 127.0.0.1:3000`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applySpiffeEndpointSocket(cmd.Flags(), "socket"); err != nil {
				return err
			}
			out, err := envoyconfig.Generate(o)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	o.AddFlags(cmd.Flags(), endpoint.DefaultLayout().Socket)
	_ = cmd.MarkFlagRequired("spiffe-id")
	return cmd
}
