package cli

import (
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/fsutil"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

func newX509Cmd() *cobra.Command {
	cmd := &cobra.Command{Use: "x509", Short: "Mint X.509-SVIDs"}
	cmd.AddCommand(newX509MintCmd())
	return cmd
}

func newX509MintCmd() *cobra.Command {
	var (
		admin, spiffeID, outDir, keyType, csrFile, output string
		dns                                               []string
		ttl                                               time.Duration
		printKey                                          bool
	)
	cmd := &cobra.Command{
		Use:   "mint --spiffe-id ID --out-dir DIR",
		Short: "Mint an X.509-SVID; the key is made here and never leaves this machine",
		Long: `Mint an X.509-SVID through the admin API. The key pair is generated locally
and only a CSR is sent; with --csr, an existing CSR is signed instead and no
key is written.

--out-dir receives svid.pem (leaf then chain), svid.key (PKCS#8, mode 0600)
and bundle.pem (the trust bundle), each written atomically. Without
--out-dir the private key is printed only with --print-key; with --csr there
is no key, and the SVID is printed. -o json|yaml prints a document: without
--out-dir it carries svid_pem and bundle_pem (and key_pem with --print-key).`,
		Example: `  meshid x509 mint --spiffe-id spiffe://cluster.local/ns/shop/sa/web --ttl 1h --out-dir ./certs`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			// A key printed to a terminal or a CI log is a key leaked: it
			// goes to stdout only when asked for by name.
			if outDir == "" && csrFile == "" && !printKey {
				return errors.New("the private key would be printed: give --out-dir DIR to write the files, or --print-key to print it")
			}
			if ttl < 0 {
				return fmt.Errorf("--ttl must be positive")
			}
			req := &adminv1.MintX509SVIDRequest{SpiffeId: spiffeID, DnsNames: dns}
			if ttl > 0 {
				req.Ttl = durationpb.New(ttl)
			}
			var keyPEM []byte
			if csrFile != "" {
				b, err := os.ReadFile(csrFile)
				if err != nil {
					return fmt.Errorf("--csr: %w", err)
				}
				req.Csr = b
			} else {
				kt, err := ca.ParseKeyType(keyType)
				if err != nil {
					return fmt.Errorf("--key-type: %w", err)
				}
				key, err := ca.GenerateKey(kt)
				if err != nil {
					return err
				}
				csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
				if err != nil {
					return fmt.Errorf("make CSR: %w", err)
				}
				req.Csr = csr
				if keyPEM, err = ca.EncodeKeyPEM(key); err != nil {
					return err
				}
			}
			resp, err := adminCall(cmd, admin, adminv1.AdminServiceClient.MintX509SVID, req)
			if err != nil {
				return err
			}
			chainPEM := ca.EncodeCertsPEM(resp.GetCertChain()...)
			bundlePEM := ca.EncodeCertsPEM(resp.GetBundle()...)
			if outDir == "" {
				if structured(output) {
					doc := map[string]any{
						"spiffe_id": resp.GetSpiffeId(), "serial": resp.GetSerial(),
						"not_before": resp.GetNotBefore().AsTime(), "not_after": resp.GetNotAfter().AsTime(),
						"svid_pem": string(chainPEM), "bundle_pem": string(bundlePEM),
					}
					if keyPEM != nil {
						doc["key_pem"] = string(keyPEM)
					}
					return writeOut(cmd.OutOrStdout(), output, doc)
				}
				out := cmd.OutOrStdout()
				out.Write(chainPEM)
				out.Write(keyPEM)
				return nil
			}
			if err := os.MkdirAll(outDir, 0o755); err != nil {
				return fmt.Errorf("--out-dir: %w", err)
			}
			files := []struct {
				name string
				data []byte
				perm os.FileMode
			}{
				{"svid.pem", chainPEM, 0o644},
				{"svid.key", keyPEM, 0o600},
				{"bundle.pem", bundlePEM, 0o644},
			}
			for _, f := range files {
				if f.data == nil {
					continue
				}
				// fsutil's error already names the file ("write DIR/svid.pem: ...").
				if err := fsutil.WriteFileAtomic(filepath.Join(outDir, f.name), f.data, f.perm); err != nil {
					return err
				}
			}
			if structured(output) {
				return writeOut(cmd.OutOrStdout(), output, map[string]any{
					"spiffe_id": resp.GetSpiffeId(), "serial": resp.GetSerial(),
					"not_before": resp.GetNotBefore().AsTime(), "not_after": resp.GetNotAfter().AsTime(),
					"out_dir": outDir,
				})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "minted %s serial %s valid until %s\nwrote %s\n",
				resp.GetSpiffeId(), resp.GetSerial(), resp.GetNotAfter().AsTime().Format(time.RFC3339), outDir)
			return nil
		},
	}
	adminFlag(cmd, &admin)
	fs := cmd.Flags()
	fs.StringVar(&spiffeID, "spiffe-id", "", "SPIFFE ID of the SVID (required)")
	fs.StringVar(&outDir, "out-dir", "", "directory for svid.pem, svid.key and bundle.pem (required unless --print-key or --csr)")
	fs.BoolVar(&printKey, "print-key", false, "without --out-dir: print the SVID and its private key to stdout (PEM, or key_pem in -o json|yaml)")
	durationFlag(fs, &ttl, "ttl", 0, "SVID lifetime, at least 1m and at most the CA's remaining life (default: the server's --svid-ttl)")
	fs.StringSliceVar(&dns, "dns", nil, "DNS SAN to add (repeat or comma-separate)")
	fs.StringVar(&keyType, "key-type", string(ca.KeyP256), "key type: ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519")
	fs.StringVar(&csrFile, "csr", "", "sign this PEM or DER CSR instead of making a key")
	outputFlag(fs, &output)
	_ = cmd.MarkFlagRequired("spiffe-id")
	return cmd
}
