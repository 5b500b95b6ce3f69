package cli

import (
	"fmt"
	"runtime"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/ca"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

func newBundleCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "bundle", Short: "Show the trust bundle"}
	var admin, format string
	show := &cobra.Command{
		Use:   "show",
		Short: "Print the trust bundle as PEM or as a SPIFFE bundle (JWKS)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if format != "pem" && format != "jwks" {
				return fmt.Errorf("unknown --format %q (want pem or jwks)", format)
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.GetBundle, &adminv1.GetBundleRequest{})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if format == "jwks" {
				_, err = fmt.Fprintln(out, string(resp.GetSpiffeBundleJson()))
				return err
			}
			_, err = out.Write(ca.EncodeCertsPEM(resp.GetX509Authorities()...))
			return err
		},
	}
	adminFlag(show, &admin)
	show.Flags().StringVar(&format, "format", "pem", "pem, or jwks: the SPIFFE trust bundle document (x509-svid and jwt-svid keys, spiffe_refresh_hint, spiffe_sequence)")
	cmd.AddCommand(show)
	return cmd
}

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Inspect and rotate the certificate authorities"}
	var admin, output string
	show := &cobra.Command{
		Use:   "show",
		Short: "Show every CA in the trust bundle: state, validity and fingerprint",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.ListCAs, &adminv1.ListCAsRequest{})
			if err != nil {
				return err
			}
			if structured(output) {
				for _, x := range resp.GetCas() {
					x.CertDer = nil // the fingerprint names it; bundle show prints it
				}
				return writeOutList(cmd.OutOrStdout(), output, resp.GetCas())
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "STATE\tKEY\tNOT BEFORE\tNOT AFTER\tSERVED SVIDS\tSUBJECT\tSHA-256 FINGERPRINT")
			for _, x := range resp.GetCas() {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", x.GetState(), x.GetKeyType(),
					x.GetNotBefore().AsTime().Format(time.RFC3339), x.GetNotAfter().AsTime().Format(time.RFC3339),
					x.GetServedSvids(), x.GetSubject(), x.GetFingerprint())
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, x := range resp.GetCas() {
				if x.GetState() == string(store.CATainted) {
					fmt.Fprintf(cmd.OutOrStdout(), "emergency rotation in progress: %d served SVID(s) still on tainted CA %s; it leaves the trust bundle at 0\n",
						x.GetServedSvids(), x.GetFingerprint())
				}
				if h := x.GetActivationHeld(); h != "" {
					fmt.Fprintf(cmd.OutOrStdout(), "prepared CA %s: %s (see meshid status)\n", x.GetFingerprint(), h)
				}
			}
			return nil
		},
	}
	adminFlag(show, &admin)
	outputFlag(show.Flags(), &output)
	cmd.AddCommand(show, newCAPrepareCmd(), newCAActivateCmd(), newCARotateCmd())
	return cmd
}

func newCARotateCmd() *cobra.Command {
	var admin, output string
	var now, dropOld bool
	cmd := &cobra.Command{
		Use:   "rotate --now",
		Short: "Emergency CA rotation: replace the CA at once and re-issue every served SVID",
		Long: `Replace the CA at once: the answer to a compromised CA key, or to a revocation
too large for a CRL (a revoke past --max-crl-serials is refused and points
here). A new CA is prepared and activated without the publication window; every
SVID the server serves is re-issued by it, spread over time to stay inside the
signing limits (--sign-rate, --sign-concurrency); the old CA is tainted and
leaves the trust bundle as soon as no served SVID depends on it. With it go its
CRL and every revocation on it: nothing chains to it any more.

--drop-old removes the old CA from the bundle at once: peers still holding its
SVIDs fail handshakes until theirs are re-issued. SVIDs the server does not
serve (minted with 'meshid x509 mint') stop working when the old CA leaves.

Watch progress with 'meshid ca show' (SERVED SVIDS of the tainted CA) or the
meshid_svids_on_retired_ca metric. For a planned rotation use 'meshid ca
prepare', then 'meshid ca activate'.`,
		Example: `  meshid ca rotate --now
  meshid ca rotate --now --drop-old`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if !now {
				return fmt.Errorf("ca rotate replaces the CA at once and needs --now; for a planned rotation use 'meshid ca prepare', then 'meshid ca activate'")
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.RotateCA, &adminv1.RotateCARequest{DropOld: dropOld})
			if err != nil {
				return err
			}
			resp.GetCa().CertDer, resp.GetOld().CertDer = nil, nil
			if output == "json" {
				return writeJSONMessage(cmd.OutOrStdout(), resp)
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "activated CA %s; re-issuing %d served SVID(s)\n", resp.GetCa().GetFingerprint(), resp.GetReissuing())
			if resp.GetOld().GetState() == string(store.CARevoked) {
				fmt.Fprintf(out, "old CA %s removed from the trust bundle\n", resp.GetOld().GetFingerprint())
			} else {
				fmt.Fprintf(out, "old CA %s tainted: it leaves the trust bundle when no served SVID depends on it (%d now); see 'meshid ca show'\n",
					resp.GetOld().GetFingerprint(), resp.GetOld().GetServedSvids())
			}
			return nil
		},
	}
	adminFlag(cmd, &admin)
	cmd.Flags().BoolVar(&now, "now", false, "replace the CA now (required: this is the emergency path)")
	cmd.Flags().BoolVar(&dropOld, "drop-old", false, "remove the old CA from the trust bundle at once, accepting failed handshakes for SVIDs not yet re-issued")
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newCAPrepareCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "prepare",
		Short: "Make the next CA and publish it in the trust bundle, without signing with it yet",
		Long: `Make the next CA and publish it in the trust bundle. Every connected workload
receives the new bundle at once; the CA does not sign until it is activated,
so peers trust it before any certificate it signs reaches them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.PrepareCA, &adminv1.PrepareCARequest{})
			if err != nil {
				return err
			}
			resp.GetCa().CertDer = nil
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetCa())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "prepared CA %s (valid until %s); it is in the trust bundle now\n",
				resp.GetCa().GetFingerprint(), resp.GetCa().GetNotAfter().AsTime().Format(time.RFC3339))
			return nil
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newCAActivateCmd() *cobra.Command {
	var admin, output string
	var force bool
	cmd := &cobra.Command{
		Use:   "activate",
		Short: "Sign with the prepared CA from now on; the old CA is retired",
		Long: `Make the prepared CA the signing CA. The old CA is retired: it stays in the
trust bundle until the last SVID it signed expires, then leaves it. SVIDs are
re-issued by the new CA at their next renewal (or at once with the server's
--rotate-svids-on-activation).

Activation is refused until the prepared CA has been in the bundle for the
publication window (--ca-prepare-window, default 2 x --svid-ttl), so every
peer trusts it first; --force overrides that.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			// Not gated by convergence: this is the operator's decision, but
			// one that should be made knowing which proxies lag.
			if st, err := adminCall(cmd, admin, adminv1.AdminServiceClient.Status, &adminv1.StatusRequest{}); err == nil && st.GetPreparedCa() != "" && st.GetStreamsPrepared() < st.GetStreams() {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: only %d of %d agent streams hold the prepared CA; the others will not trust SVIDs it signs until they do (meshid status)\n",
					st.GetStreamsPrepared(), st.GetStreams())
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.ActivateCA, &adminv1.ActivateCARequest{Force: force})
			if err != nil {
				return err
			}
			resp.GetCa().CertDer = nil
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetCa())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "activated CA %s; the previous CA is retired\n", resp.GetCa().GetFingerprint())
			return nil
		},
	}
	adminFlag(cmd, &admin)
	cmd.Flags().BoolVar(&force, "force", false, "activate before the publication window has passed")
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newCertsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "certs", Short: "The inventory of issued SVIDs"}
	var admin, output string
	var within time.Duration
	var includeExpired bool
	var pageSize int32
	list := &cobra.Command{
		Use:   "list",
		Short: "List issued SVIDs still live, soonest expiry first",
		Example: `  meshid certs list --expiring-within 7d
  meshid certs list -o json | jq -r '.[].serial'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if within < 0 {
				return fmt.Errorf("--expiring-within must not be negative")
			}
			if pageSize < 0 {
				return fmt.Errorf("--page-size must not be negative")
			}
			c, done, err := dialAdmin(admin)
			if err != nil {
				return err
			}
			defer done()
			req := &adminv1.ListCertsRequest{IncludeExpired: includeExpired, PageSize: pageSize}
			if within > 0 {
				req.ExpiringWithin = durationpb.New(within)
			}
			var all []*adminv1.IssuedCert
			for {
				ctx, cancel := rpcContext(cmd)
				resp, err := c.ListCerts(ctx, req)
				cancel()
				if err != nil {
					return err
				}
				all = append(all, resp.GetCerts()...)
				if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
					break
				}
			}
			if structured(output) {
				return writeOutList(cmd.OutOrStdout(), output, all)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERIAL\tSPIFFE ID\tNOT AFTER\tEXPIRES IN\tREQUESTER")
			now := time.Now()
			for _, r := range all {
				na := r.GetNotAfter().AsTime()
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", safe(r.GetSerial()), safe(r.GetSpiffeId()), na.Format(time.RFC3339), na.Sub(now).Truncate(time.Second), safe(r.GetRequester()))
			}
			return tw.Flush()
		},
	}
	adminFlag(list, &admin)
	pageSizeFlag(list, &pageSize)
	fs := list.Flags()
	durationFlag(fs, &within, "expiring-within", 0, "only SVIDs expiring within this window (e.g. 1h, 7d)")
	fs.BoolVar(&includeExpired, "include-expired", false, "include SVIDs that have already expired")
	outputFlag(fs, &output)
	cmd.AddCommand(list)
	return cmd
}

func newVersionCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the client's version, and the server's if one answers on --admin-socket",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			info := map[string]string{"client": version(), "go": runtime.Version(), "platform": runtime.GOOS + "/" + runtime.GOARCH}
			if c, done, err := dialAdmin(admin); err == nil {
				ctx, cancel := rpcContext(cmd)
				if resp, err := c.GetServerInfo(ctx, &adminv1.GetServerInfoRequest{}); err == nil {
					info["server"] = resp.GetVersion()
					info["trust_domain"] = resp.GetTrustDomain()
				}
				cancel()
				done()
			}
			if structured(output) {
				return writeOut(cmd.OutOrStdout(), output, info)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "meshid %s (%s, %s)\n", info["client"], info["go"], info["platform"])
			if s, ok := info["server"]; ok {
				fmt.Fprintf(cmd.OutOrStdout(), "server %s, trust domain %s\n", s, info["trust_domain"])
			}
			return nil
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}
