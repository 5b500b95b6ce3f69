package cli

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/controlplane"
)

// DevPrepareWindow is meshid dev's CA publication window: long enough to
// see the prepared CA in "meshid ca show", short enough that the README's
// "meshid ca activate" works a few seconds after "meshid ca prepare".
const DevPrepareWindow = 10 * time.Second

// devPrepareWindow gives meshid dev its short publication window unless
// --ca-prepare-window (or its variable or config key) says otherwise.
func devPrepareWindow(cmd *cobra.Command, cfg *controlplane.Config) {
	if !cmd.Flags().Changed("ca-prepare-window") {
		cfg.CAPrepareWindow = DevPrepareWindow
	}
	cfg.ShortPrepareWindow = true
}
