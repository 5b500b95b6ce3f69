// Package cli holds meshid's cobra commands. Commands parse flags and call
// packages; they hold no logic of their own beyond presenting results.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
)

// Version is set at link time (-ldflags "-X github.com/meshid/meshid/internal/cli.Version=v1.2.3").
var Version = ""

func version() string {
	if Version != "" {
		return Version
	}
	return controlplane.BuildVersion()
}

// Main runs the meshid command line and returns the process exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "meshid: %s\n", oneLine(err))
		return 1
	}
	return 0
}

// oneLine renders an error as the one-line reason the user reads: the gRPC
// status message without the "rpc error: code = ..." wrapping.
func oneLine(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus().Message()
	}
	// Fields also folds cobra's multi-line, tab-indented suggestion
	// ("Did you mean this?\n\tentry") into the one line.
	return strings.Join(strings.Fields(err.Error()), " ")
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "meshid",
		Short: "mTLS identity control plane: SPIFFE X.509-SVIDs for Envoy (SDS) and workloads",
		Long: `meshid mints short-lived SPIFFE X.509-SVIDs with a built-in CA and delivers
them, with the trust bundle, to Envoy over SDS and to applications over the
SPIFFE Workload API, renewing them long before they expire.

Start a development identity plane with one command:

  meshid dev

Every flag can also be set in the environment as MESHID_<FLAG> (for example
MESHID_ADMIN_SOCKET, MESHID_TRUST_DOMAIN) and, for server and dev, in a YAML
file given with --config (keys are flag names). A flag on the command line
wins over the environment, which wins over the file.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			if f := cmd.Flags().Lookup("config"); f != nil && f.Value.String() != "" {
				return applyConfigFile(cmd.Flags(), f.Value.String())
			}
			return nil
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(
		newServerCmd(), newDevCmd(),
		newEntryCmd(), newX509Cmd(), newBundleCmd(), newCACmd(), newCertsCmd(),
		newVersionCmd(), newBenchCmd(), newEnvoyCmd(), newTokenCmd(), newRevokeCmd(), newHelperCmd(), newAgentCmd(),
		newStatusCmd(), newKEKCmd(), newStoreCmd(),
	)
	refuseUnknownSubcommands(root)
	return root
}

// refuseUnknownSubcommands makes every group command (ca, entry, ...) fail
// on an argument that names none of its subcommands. Cobra itself does
// that only for the root: "meshid ca actvate" printed the help of "ca" and
// exited 0, so a script with a typo carried on as if it had worked.
func refuseUnknownSubcommands(c *cobra.Command) {
	for _, sub := range c.Commands() {
		refuseUnknownSubcommands(sub)
	}
	if c.HasParent() && c.HasSubCommands() && c.Run == nil && c.RunE == nil {
		c.Args = cobra.ArbitraryArgs
		// "meshid ca actvate --admin-socket S": the group has no such flag;
		// report the command, not the flag.
		c.FParseErrWhitelist.UnknownFlags = true
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return cmd.Help()
			}
			msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
			if cmd.SuggestionsMinimumDistance <= 0 {
				cmd.SuggestionsMinimumDistance = 2 // cobra's default, which it sets only on its own path
			}
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += fmt.Sprintf("; did you mean %q?", s[0])
			}
			return errors.New(msg + " (see " + cmd.CommandPath() + " --help)")
		}
	}
}

// applyEnv fills every flag not given on the command line from
// MESHID_<FLAG_NAME>, so containers can configure meshid without args.
func applyEnv(fs *pflag.FlagSet) error {
	var firstErr error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed || firstErr != nil {
			return
		}
		name := "MESHID_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v, ok := os.LookupEnv(name)
		if !ok {
			return
		}
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			if err := sv.Replace(strings.Split(v, ",")); err != nil {
				firstErr = fmt.Errorf("%s=%q: %w", name, v, err)
			}
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			firstErr = fmt.Errorf("%s=%q: %w", name, v, err)
		}
	})
	return firstErr
}
