package cli

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/controlplane"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newEntryCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "entry",
		Short: "Manage registration entries (which callers get which SPIFFE ID)",
	}
	cmd.AddCommand(newEntryCreateCmd(), newEntryListCmd(), newEntryDeleteCmd())
	return cmd
}

func newEntryCreateCmd() *cobra.Command {
	var (
		admin, spiffeID, output string
		selectors, dns          []string
		ttl                     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "create --spiffe-id ID --selector TYPE:KEY:VALUE [--selector ...]",
		Short: "Register a SPIFFE ID for callers that match all the selectors",
		Long: `Register a SPIFFE ID for callers that match all the given selectors.

Selectors:
  unix:uid:N  unix:gid:N  unix:pid:N          (peer credentials on the workload socket)
  k8s:ns:NAMESPACE  k8s:sa:SERVICEACCOUNT     (Kubernetes workloads)
  k8s:pod-name:N  k8s:pod-uid:U  k8s:node-name:N  k8s:pod-label:KEY:VALUE`,
		Example: `  meshid entry create --spiffe-id spiffe://cluster.local/ns/shop/sa/web --selector unix:uid:1000
  meshid entry create --spiffe-id spiffe://cluster.local/ns/shop/sa/db --selector k8s:ns:shop --selector k8s:sa:db --ttl 1h`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			e := &adminv1.Entry{SpiffeId: spiffeID, DnsNames: dns}
			for _, s := range selectors {
				sel, err := controlplane.ParseSelector(s)
				if err != nil {
					return err
				}
				e.Selectors = append(e.Selectors, &adminv1.Selector{Type: sel.Type, Value: sel.Value})
			}
			if ttl > 0 {
				e.Ttl = durationpb.New(ttl)
			} else if ttl < 0 {
				return fmt.Errorf("--ttl must be positive")
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.CreateEntry, &adminv1.CreateEntryRequest{Entry: e})
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetEntry())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created entry %s for %s\n", resp.GetEntry().GetId(), resp.GetEntry().GetSpiffeId())
			return nil
		},
	}
	adminFlag(cmd, &admin)
	fs := cmd.Flags()
	fs.StringVar(&spiffeID, "spiffe-id", "", "SPIFFE ID to register (required)")
	fs.StringArrayVar(&selectors, "selector", nil, "selector TYPE:KEY:VALUE a caller must have (repeat for several; all must match)")
	fs.StringSliceVar(&dns, "dns", nil, "DNS SAN to add to the SVID (repeat or comma-separate)")
	durationFlag(fs, &ttl, "ttl", 0, "SVID lifetime for this entry (default: the server's --svid-ttl)")
	outputFlag(fs, &output)
	_ = cmd.MarkFlagRequired("spiffe-id")
	_ = cmd.MarkFlagRequired("selector")
	return cmd
}

func newEntryListCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List registration entries",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, done, err := dialAdmin(admin)
			if err != nil {
				return err
			}
			defer done()
			var all []*adminv1.Entry
			token := ""
			for {
				ctx, cancel := rpcContext(cmd)
				resp, err := c.ListEntries(ctx, &adminv1.ListEntriesRequest{PageToken: token})
				cancel()
				if err != nil {
					return err
				}
				all = append(all, resp.GetEntries()...)
				if token = resp.GetNextPageToken(); token == "" {
					break
				}
			}
			if structured(output) {
				return writeOutList(cmd.OutOrStdout(), output, all)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tSPIFFE ID\tSELECTORS\tTTL\tDNS")
			for _, e := range all {
				var sels []string
				for _, s := range e.GetSelectors() {
					sels = append(sels, s.GetType()+":"+s.GetValue())
				}
				ttl := "default"
				if e.GetTtl() != nil {
					ttl = e.GetTtl().AsDuration().String()
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.GetId(), e.GetSpiffeId(), strings.Join(sels, ","), ttl, strings.Join(e.GetDnsNames(), ","))
			}
			return tw.Flush()
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func newEntryDeleteCmd() *cobra.Command {
	var admin string
	cmd := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a registration entry: its SVIDs are no longer renewed and its live ones are revoked",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.DeleteEntry, &adminv1.DeleteEntryRequest{Id: args[0]})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted entry %s (%s); %d live certificate(s) revoked\n",
				resp.GetEntry().GetId(), resp.GetEntry().GetSpiffeId(), len(resp.GetRevokedSerials()))
			return nil
		},
	}
	adminFlag(cmd, &admin)
	return cmd
}
