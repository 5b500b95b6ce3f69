package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/etcdstore"
	"github.com/meshid/meshid/store/migrate"
)

func newStoreCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "store",
		Short: "Work on a server's store directly: migrate between bolt and etcd",
		Long: `Commands that open a meshid store themselves rather than asking a running
server. A bolt store (a server's --data-dir) can only be opened while no
server uses it: stop the server first. An etcd store is named by its
client URLs and the --etcd-* flags, as the server's are.`,
	}
	cmd.AddCommand(newStoreMigrateCmd())
	return cmd
}

// etcdClientFlags are the etcd connection flags of a command that opens an
// etcd store itself.
type etcdClientFlags struct{ ca, cert, key, prefix string }

func (f *etcdClientFlags) register(cmd *cobra.Command) {
	fs := cmd.Flags()
	fs.StringVar(&f.ca, "etcd-ca", "", "PEM file of the CA that signed the etcd servers' certificates (default: the system roots)")
	fs.StringVar(&f.cert, "etcd-cert", "", "PEM client certificate for etcd (with --etcd-key)")
	fs.StringVar(&f.key, "etcd-key", "", "PEM private key of --etcd-cert")
	fs.StringVar(&f.prefix, "etcd-prefix", etcdstore.DefaultPrefix, "key prefix of the meshid store in etcd (must end in /)")
}

// tlsConfig is the client TLS for endpoints: nil when every endpoint is
// plain http (loopback tests), an error when https and http are mixed or
// a file does not load.
func (f *etcdClientFlags) tlsConfig(endpoints []string) (*tls.Config, error) {
	secure := 0
	for _, ep := range endpoints {
		if strings.HasPrefix(ep, "https://") {
			secure++
		}
	}
	if secure == 0 {
		if f.ca != "" || f.cert != "" || f.key != "" {
			return nil, errors.New("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd endpoints")
		}
		return nil, nil
	}
	if secure != len(endpoints) {
		return nil, errors.New("etcd endpoints mix https:// and http://")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.ca != "" {
		pem, err := os.ReadFile(f.ca)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-ca %s: no PEM certificate in it", f.ca)
		}
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("--etcd-cert and --etcd-key go together")
	}
	if f.cert != "" {
		c, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}

// etcdOpener opens an etcd target with tlsCfg and prefix.
func etcdOpener(tlsCfg *tls.Config, prefix string) migrate.Opener {
	return func(ctx context.Context, t migrate.Target, o migrate.OpenOptions) (store.Store, error) {
		es, err := etcdstore.Open(ctx, etcdstore.Options{Endpoints: t.Endpoints, TLS: tlsCfg, Prefix: prefix, Logger: o.Logger})
		if err != nil {
			return nil, err
		}
		return es, nil
	}
}

func newStoreMigrateCmd() *cobra.Command {
	var (
		from, to, output string
		etcd             etcdClientFlags
	)
	cmd := &cobra.Command{
		Use:   "migrate --from bolt:DIR|etcd:URL,... --to bolt:DIR|etcd:URL,...",
		Short: "Copy a store to another backend (bolt to etcd, or etcd to bolt for a rollback), checked",
		Long: `Copy everything a meshid store holds (CA records with their sealed keys and
chains, registration entries, the SVID inventory, the audit trail, join
tokens, revoked serials, node agent records, CRL counters) into an empty
store of another backend, then read the target back and check it: rows
per kind, the trust bundle (every CA certificate and JWT key not revoked)
and every row. The summary goes to stdout, progress to stderr.

  meshid store migrate --from bolt:/var/lib/meshid --to etcd:https://e1:2379,https://e2:2379 \
      --etcd-ca ca.pem --etcd-cert c.pem --etcd-key k.pem
  meshid store migrate --from etcd:https://e1:2379 --etcd-ca ca.pem ... --to bolt:/var/lib/meshid-rollback

bolt:DIR is a server's --data-dir (the store is DIR/meshid.db). Stop the
server on a bolt source first: a running server holds the file. The target
must hold nothing (a new data dir, or an unused --etcd-prefix); a failed
run into a new bolt dir removes what it made.

No key-encryption key is needed: CA keys are copied sealed, as they are
stored. The servers on the target must use the KEK the source's servers
used: give them --kek-file (a bolt source's is DIR/kek unless the server
was started with --kek-file).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			if from == "" || to == "" {
				return errors.New("--from and --to are both required")
			}
			src, err := migrate.Parse(from)
			if err != nil {
				return fmt.Errorf("--from: %w", err)
			}
			dst, err := migrate.Parse(to)
			if err != nil {
				return fmt.Errorf("--to: %w", err)
			}
			openers := migrate.DefaultOpeners()
			var endpoints []string
			switch {
			case src.Backend == migrate.Etcd && dst.Backend == migrate.Etcd:
				return errors.New("--from and --to are both etcd: one set of --etcd-* flags cannot name two stores; go through a bolt dir")
			case src.Backend == migrate.Etcd:
				endpoints = src.Endpoints
			case dst.Backend == migrate.Etcd:
				endpoints = dst.Endpoints
			}
			if endpoints != nil {
				if !strings.HasSuffix(etcd.prefix, "/") {
					return fmt.Errorf("--etcd-prefix %q must end in /", etcd.prefix)
				}
				tlsCfg, err := etcd.tlsConfig(endpoints)
				if err != nil {
					return err
				}
				openers[migrate.Etcd] = etcdOpener(tlsCfg, etcd.prefix)
			}
			errOut := cmd.ErrOrStderr()
			log := slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelWarn}))
			rep, err := migrate.Run(cmd.Context(), openers, src, dst, log, func(line string) {
				fmt.Fprintf(errOut, "migrate: %s\n", line)
			})
			for _, d := range rep.Differences {
				fmt.Fprintf(errOut, "migrate: %s\n", d)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(errOut, "migrate: done; start the servers on %s with the KEK of %s\n", dst, src)
			if structured(output) {
				return writeOut(cmd.OutOrStdout(), output, rep)
			}
			return writeMigrateTable(cmd, &rep)
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "source store: bolt:DIR (a stopped server's data dir) or etcd:URL[,URL...]")
	cmd.Flags().StringVar(&to, "to", "", "target store, empty: bolt:DIR or etcd:URL[,URL...]")
	etcd.register(cmd)
	outputFlag(cmd.Flags(), &output)
	return cmd
}

func writeMigrateTable(cmd *cobra.Command, rep *migrate.Report) error {
	out := cmd.OutOrStdout()
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tSOURCE\tTARGET")
	s, t := rep.Source, rep.Target
	for _, row := range []struct {
		name string
		a, b int
	}{
		{"CA records", s.CAs, t.CAs}, {"entries", s.Entries, t.Entries}, {"inventory rows", s.SVIDs, t.SVIDs},
		{"audit events", s.Audit, t.Audit}, {"join tokens", s.Tokens, t.Tokens}, {"revoked serials", s.Revoked, t.Revoked},
		{"agent records", s.Agents, t.Agents}, {"CRL counters", s.CRLNumbers, t.CRLNumbers},
	} {
		fmt.Fprintf(tw, "%s\t%d\t%d\n", row.name, row.a, row.b)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(out, "trust bundle: %d CA certificates and JWT keys, identical on both sides\n", len(rep.Bundle))
	fmt.Fprintf(out, "every row reads back as exported: %s -> %s\n", rep.From, rep.To)
	return nil
}
