package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/entry"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// entryLimits is the documented size limits of an entry, for --help.
var entryLimits = fmt.Sprintf(`Limits (refused with InvalidArgument beyond them):
  SPIFFE ID at most 2048 bytes; at most %d selectors, each at most %d bytes
  (type:key:value) of printable characters; at most %d DNS names, each a
  host name the CA signs (no IP addresses, no "*.com"); hint at most %d bytes;
  --ttl at least 1m and at most the CA's remaining life.`,
	entry.MaxSelectorsPerEntry, entry.MaxSelectorLen, entry.MaxDNSNamesPerEntry, entry.MaxHintLen)

const selectorHelp = `Selectors, by the attestor that produces them (a kind no attestor of the
server produces is refused: such an entry could never match):
  unix attestor (built in: the workload socket's peer credentials):
    unix:uid:N  unix:gid:N  unix:pid:N        (unix:pid needs unix:uid beside it)
    unix:path:/ABS/PATH  unix:sha256:HEX      (the caller's executable: its path, its SHA-256)
  k8s attestor (meshid agent --k8s-workload-attestor: this node's pods, from the API server):
    k8s:ns:NAMESPACE  k8s:sa:SERVICEACCOUNT  k8s:pod-name:NAME  k8s:pod-uid:UID
    k8s:pod-label:KEY:VALUE  k8s:container-name:NAME  k8s:container-image:IMAGE
    k8s:node-name:NODE                        (image: as the pod spec names it, or the runtime's, with digest)`

func newEntryCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "entry",
		Short: "Manage registration entries (which callers get which SPIFFE ID)",
	}
	cmd.AddCommand(newEntryCreateCmd(), newEntryListCmd(), newEntryShowCmd(), newEntryUpdateCmd(), newEntryDeleteCmd())
	return cmd
}

// safe renders a server-provided string for a terminal: control and other
// non-printable characters are escaped (strconv.Quote style), so stored
// data cannot move the cursor, forge lines or hide text.
func safe(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) || r == utf8.RuneError {
			return strconv.QuoteToASCII(s)
		}
	}
	return s
}

// parseSelector parses a --selector and refuses, before any call to the
// server, one that the server would: the CLI is built with the server's
// attestors, so the kinds it accepts are the same.
func parseSelector(s string) (entry.Selector, error) {
	sel, err := entry.Parse(s)
	if err != nil {
		return entry.Selector{}, err
	}
	return sel, sel.Validate(attest.Builtin())
}

func parseSelectors(in []string) ([]*adminv1.Selector, error) {
	var out []*adminv1.Selector
	for _, s := range in {
		sel, err := parseSelector(s)
		if err != nil {
			return nil, err
		}
		out = append(out, &adminv1.Selector{Type: sel.Type, Value: sel.Value})
	}
	return out, nil
}

func newEntryCreateCmd() *cobra.Command {
	var (
		admin, spiffeID, output, hint, parent string
		selectors, dns                        []string
		ttl                                   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "create --spiffe-id ID --selector TYPE:KEY:VALUE [--selector ...]",
		Short: "Register a SPIFFE ID for callers that match all the selectors",
		Long: `Register a SPIFFE ID for callers that match all the given selectors.

Without --parent-id every node agent may serve the entry to its matching
workloads, and so may the server's own workload socket. With --parent-id
spiffe://<trust-domain>/meshid/agent/<method>/<node> only that agent may
(the agent's ID is printed by meshid token create --agent and in its log).
The same SPIFFE ID and selectors may be registered once without a parent
and once under each agent.

` + selectorHelp + `

` + entryLimits,
		Example: `  meshid entry create --spiffe-id spiffe://cluster.local/ns/shop/sa/web --selector unix:uid:1000
  meshid entry create --spiffe-id spiffe://cluster.local/ns/shop/sa/db --selector unix:uid:1000 --selector unix:path:/usr/local/bin/db --ttl 1h --hint db
  meshid entry create --spiffe-id spiffe://cluster.local/ns/shop/sa/web --selector unix:uid:1000 --parent-id spiffe://cluster.local/meshid/agent/join/web-1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			e := &adminv1.Entry{SpiffeId: spiffeID, DnsNames: dns, Hint: hint, ParentId: parent}
			var err error
			if e.Selectors, err = parseSelectors(selectors); err != nil {
				return err
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
			fmt.Fprintf(cmd.OutOrStdout(), "created entry %s for %s\n", resp.GetEntry().GetId(), safe(resp.GetEntry().GetSpiffeId()))
			return nil
		},
	}
	adminFlag(cmd, &admin)
	fs := cmd.Flags()
	fs.StringVar(&spiffeID, "spiffe-id", "", "SPIFFE ID to register (required)")
	fs.StringArrayVar(&selectors, "selector", nil, "selector TYPE:KEY:VALUE a caller must have (repeat for several; all must match)")
	fs.StringSliceVar(&dns, "dns", nil, "DNS SAN to add to the SVID (repeat or comma-separate)")
	durationFlag(fs, &ttl, "ttl", 0, "SVID lifetime for this entry, at least 1m (default: the server's --svid-ttl)")
	fs.StringVar(&hint, "hint", "", "Workload API hint sent with this entry's SVIDs, so a workload holding several can pick one (default: the entry ID)")
	fs.StringVar(&parent, "parent-id", "", "SPIFFE ID of the one node agent that may serve this entry, spiffe://<td>/meshid/agent/<method>/<node> (default: every agent and the server's own socket)")
	outputFlag(fs, &output)
	_ = cmd.MarkFlagRequired("spiffe-id")
	_ = cmd.MarkFlagRequired("selector")
	return cmd
}

func newEntryUpdateCmd() *cobra.Command {
	var (
		admin, output, hint, parent string
		selectors, dns              []string
		ttl                         time.Duration
	)
	cmd := &cobra.Command{
		Use:   "update ID [--selector ...] [--dns ...] [--ttl ...] [--hint ...] [--parent-id ...]",
		Short: "Change an entry's selectors, DNS names, TTL, hint or parent",
		Long: `Change an entry. Only the flags given change: --selector replaces the whole
selector set, --dns the DNS names (--dns "" removes them all), --ttl the SVID
lifetime (--ttl 0 means the server default), --hint the Workload API hint
(--hint "" means the entry ID), --parent-id the one agent that may serve it
(--parent-id "" removes the parent: every agent and the server's own socket
may serve it again). The update is validated as at creation; a
refused update changes nothing. Callers holding the entry get a new SVID at
once; callers that no longer match lose it.

` + entryLimits,
		Example: `  meshid entry update 1b4e28ba-2fa1-41d2-883f-0016d3cca427 --dns web.shop.svc --ttl 2h
  meshid entry update 1b4e28ba-2fa1-41d2-883f-0016d3cca427 --parent-id spiffe://cluster.local/meshid/agent/join/web-2
  meshid entry update 1b4e28ba-2fa1-41d2-883f-0016d3cca427 --parent-id ""`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			req := &adminv1.UpdateEntryRequest{Id: args[0]}
			fs := cmd.Flags()
			var err error
			if req.Selectors, err = parseSelectors(selectors); err != nil {
				return err
			}
			if fs.Changed("dns") {
				req.UpdateDnsNames = true
				for _, d := range dns {
					if d != "" {
						req.DnsNames = append(req.DnsNames, d)
					}
				}
			}
			if fs.Changed("ttl") {
				if ttl < 0 {
					return fmt.Errorf("--ttl must not be negative")
				}
				req.Ttl = durationpb.New(ttl)
			}
			if fs.Changed("hint") {
				req.Hint = &hint
			}
			if fs.Changed("parent-id") {
				req.ParentId = &parent
			}
			if len(req.Selectors) == 0 && !req.UpdateDnsNames && req.Ttl == nil && req.Hint == nil && req.ParentId == nil {
				return fmt.Errorf("nothing to update: give --selector, --dns, --ttl, --hint or --parent-id")
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.UpdateEntry, req)
			if err != nil {
				return err
			}
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, resp.GetEntry())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "updated entry %s for %s\n", resp.GetEntry().GetId(), safe(resp.GetEntry().GetSpiffeId()))
			return nil
		},
	}
	adminFlag(cmd, &admin)
	fs := cmd.Flags()
	fs.StringArrayVar(&selectors, "selector", nil, "new selector set TYPE:KEY:VALUE (repeat for several; replaces all)")
	fs.StringSliceVar(&dns, "dns", nil, "new DNS SANs (repeat or comma-separate; replaces all, \"\" for none)")
	durationFlag(fs, &ttl, "ttl", 0, "new SVID lifetime, at least 1m (0: the server's --svid-ttl)")
	fs.StringVar(&hint, "hint", "", "new Workload API hint (\"\": the entry ID)")
	fs.StringVar(&parent, "parent-id", "", "new parent, the SPIFFE ID of the one node agent that may serve the entry (\"\": none, every agent and the server's own socket)")
	outputFlag(fs, &output)
	return cmd
}

func newEntryShowCmd() *cobra.Command {
	var admin, output string
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show one registration entry",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.GetEntry, &adminv1.GetEntryRequest{Id: args[0]})
			if err != nil {
				return err
			}
			e := resp.GetEntry()
			if structured(output) {
				return writeOutMessage(cmd.OutOrStdout(), output, e)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "ID\t%s\n", safe(e.GetId()))
			fmt.Fprintf(tw, "SPIFFE ID\t%s\n", safe(e.GetSpiffeId()))
			fmt.Fprintf(tw, "SELECTORS\t%s\n", selectorsText(e))
			fmt.Fprintf(tw, "TTL\t%s\n", ttlText(e))
			fmt.Fprintf(tw, "DNS\t%s\n", dnsText(e))
			fmt.Fprintf(tw, "HINT\t%s\n", hintText(e))
			fmt.Fprintf(tw, "PARENT\t%s\n", parentText(e))
			fmt.Fprintf(tw, "CREATED\t%s\n", e.GetCreatedAt().AsTime().Format(time.RFC3339))
			return tw.Flush()
		},
	}
	adminFlag(cmd, &admin)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func selectorsText(e *adminv1.Entry) string {
	sels := make([]string, 0, len(e.GetSelectors()))
	for _, s := range e.GetSelectors() {
		sels = append(sels, safe(s.GetType()+":"+s.GetValue()))
	}
	return strings.Join(sels, ",")
}

func ttlText(e *adminv1.Entry) string {
	if e.GetTtl() != nil {
		return e.GetTtl().AsDuration().String()
	}
	return "default"
}

func dnsText(e *adminv1.Entry) string {
	names := make([]string, 0, len(e.GetDnsNames()))
	for _, n := range e.GetDnsNames() {
		names = append(names, safe(n))
	}
	return strings.Join(names, ",")
}

func hintText(e *adminv1.Entry) string {
	if e.GetHint() == "" {
		return "(entry id)"
	}
	return safe(e.GetHint())
}

func parentText(e *adminv1.Entry) string {
	if e.GetParentId() == "" {
		return "(none: every agent and the server)"
	}
	return safe(e.GetParentId())
}

// pageSizeFlag adds --page-size to a listing command.
func pageSizeFlag(cmd *cobra.Command, p *int32) {
	cmd.Flags().Int32Var(p, "page-size", 0, "rows the server returns per request (0: the server's maximum, 5000); every page is fetched and printed")
}

func newEntryListCmd() *cobra.Command {
	var admin, output string
	var pageSize int32
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List registration entries",
		Long: `List every registration entry. The server returns them in pages (of at most
--page-size entries and about 2 MiB); the CLI fetches every page and prints
them together (-o json: one array).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if pageSize < 0 {
				return fmt.Errorf("--page-size must not be negative")
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
				resp, err := c.ListEntries(ctx, &adminv1.ListEntriesRequest{PageToken: token, PageSize: pageSize})
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
			return writeEntryTable(cmd.OutOrStdout(), all)
		},
	}
	adminFlag(cmd, &admin)
	pageSizeFlag(cmd, &pageSize)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func writeEntryTable(w io.Writer, all []*adminv1.Entry) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSPIFFE ID\tSELECTORS\tTTL\tDNS\tHINT\tPARENT")
	for _, e := range all {
		hint := ""
		if e.GetHint() != "" {
			hint = safe(e.GetHint())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", safe(e.GetId()), safe(e.GetSpiffeId()), selectorsText(e), ttlText(e), dnsText(e), hint, safe(e.GetParentId()))
	}
	return tw.Flush()
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
				resp.GetEntry().GetId(), safe(resp.GetEntry().GetSpiffeId()), len(resp.GetRevokedSerials()))
			return nil
		},
	}
	adminFlag(cmd, &admin)
	return cmd
}
