package cli

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/kek"
)

func newKEKCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kek",
		Short: "Manage the key-encryption key that seals CA keys at rest",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "create FILE",
		Short: "Make a new key-encryption key file (0600); refuses to overwrite one",
		Long: `Make a new key-encryption key (32 random bytes, hex) in FILE, mode 0600.

A single server on bolt makes its own in --data-dir on first start. Replicas
on etcd (--store etcd) share the CA keys sealed in etcd and so must share one
KEK: make it once with this command and give the same file to every replica
as --kek-file (on Kubernetes: one Secret mounted by every replica). Losing it
makes every sealed CA key unrecoverable: keep a copy offline.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := kek.Create(args[0]); err != nil {
				if errors.Is(err, fs.ErrExist) {
					return fmt.Errorf("%s already exists; a KEK is never overwritten (the CA keys sealed under it would be lost)", args[0])
				}
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote a new key-encryption key to %s\n", args[0])
			return nil
		},
	})
	return cmd
}
