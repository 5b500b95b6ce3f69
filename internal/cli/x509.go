package cli

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/ca"
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
	)
	cmd := &cobra.Command{
		Use:   "mint --spiffe-id ID --out-dir DIR",
		Short: "Mint an X.509-SVID; the key is made here and never leaves this machine",
		Long: `Mint an X.509-SVID through the admin API. The key pair is generated locally
and only a CSR is sent; with --csr, an existing CSR is signed instead and no
key is written.

--out-dir receives svid.pem (leaf then chain), svid.key (PKCS#8, mode 0600)
and bundle.pem (the trust bundle), each written atomically.`,
		Example: `  meshid x509 mint --spiffe-id spiffe://cluster.local/ns/shop/sa/web --ttl 1h --out-dir ./certs`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
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
				if err := writeFileAtomic(filepath.Join(outDir, f.name), f.data, f.perm); err != nil {
					return fmt.Errorf("write %s: %w", f.name, err)
				}
			}
			if output == "json" {
				return writeJSON(cmd.OutOrStdout(), map[string]any{
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
	fs.StringVar(&outDir, "out-dir", "", "directory for svid.pem, svid.key and bundle.pem (default: print PEM to stdout)")
	durationFlag(fs, &ttl, "ttl", 0, "SVID lifetime (default: the server's --svid-ttl; never beyond the CA)")
	fs.StringSliceVar(&dns, "dns", nil, "DNS SAN to add (repeat or comma-separate)")
	fs.StringVar(&keyType, "key-type", string(ca.KeyP256), "key type: ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519")
	fs.StringVar(&csrFile, "csr", "", "sign this PEM or DER CSR instead of making a key")
	outputFlag(fs, &output)
	_ = cmd.MarkFlagRequired("spiffe-id")
	return cmd
}
