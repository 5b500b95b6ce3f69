package cli

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newRevokeCmd() *cobra.Command {
	var admin, spiffeID, serial, output string
	cmd := &cobra.Command{
		Use:   "revoke --spiffe-id ID | --serial SERIAL",
		Short: "Kill an identity now: put its live certificates on the CRL pushed to every peer",
		Long: `Revoke certificates before they expire. The CRLs, one per CA, are pushed at
once to every peer: in the SDS validation_context (crl) and in the Workload
API's crl field, so peers that apply them refuse the certificate in seconds.

--spiffe-id  every live certificate of that identity; its registration
             entries and join tokens are deleted so it is not renewed (a new
             token lets remote proxies use it again).
--serial     one certificate (hex, as 'meshid certs list' shows it), and
             every certificate renewed from it; a local workload being served
             it gets a fresh one at once.

A remote proxy (--sds-listen, --sds-rest-listen) that signed in with a revoked
certificate, or holds a revoked identity, has its streams closed with
PermissionDenied and must sign in again with a new join token. JWT-SVIDs of a
revoked identity are refused by the Workload API's ValidateJWTSVID until they
expire; validators that check offline against the JWT bundle cannot know.

A revoked serial leaves the CRL when its certificate expires. The CRLs are
bounded (--max-crl-serials on the server, default 10,000): a revoke past it is
refused, and the answer to a mass revocation or a stolen CA key is
'meshid ca rotate --now'.`,
		Example: `  meshid revoke --spiffe-id spiffe://cluster.local/ns/shop/sa/web
  meshid revoke --serial 5634909319...`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if (spiffeID == "") == (serial == "") {
				return errors.New("give exactly one of --spiffe-id or --serial")
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.Revoke, &adminv1.RevokeRequest{SpiffeId: spiffeID, Serial: serial})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %d certificate(s)", len(resp.GetSerials()))
			if len(resp.GetSerials()) > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), ": %s", strings.Join(resp.GetSerials(), ", "))
			}
			fmt.Fprintln(cmd.OutOrStdout())
			if n := len(resp.GetDeletedEntryIds()); n > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "deleted %d entr(ies): %s\n", n, strings.Join(resp.GetDeletedEntryIds(), ", "))
			}
			return nil
		},
	}
	adminFlag(cmd, &admin)
	fs := cmd.Flags()
	fs.StringVar(&spiffeID, "spiffe-id", "", "revoke every live certificate of this identity and delete its entries")
	fs.StringVar(&serial, "serial", "", "revoke one certificate by serial (hex)")
	outputFlag(fs, &output)
	return cmd
}
