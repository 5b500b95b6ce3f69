package cli

import (
	"github.com/spf13/cobra"

	"github.com/meshid/meshid/endpoint"
	"github.com/meshid/meshid/helper"
)

func newHelperCmd() *cobra.Command {
	var (
		c         helper.Config
		logLevel  string
		logFormat string
	)
	cmd := &cobra.Command{
		Use:   "helper --dir DIR [--reload-cmd CMD | --signal SIG --pid-file FILE]",
		Short: "Keep an SVID, its key and the trust bundle as files, for programs that cannot use the Workload API",
		Long: `Watch the SPIFFE Workload API on --socket and keep this process's X.509-SVID
as files in --dir, for programs that only read certificates from disk (nginx,
databases, legacy daemons):

  svid.pem    the SVID chain: leaf first, then intermediates (PEM)
  svid.key    its private key, PKCS#8 PEM, mode 0600
  bundle.pem  the trust bundle of the SVID's trust domain (PEM)
  crl.pem     the CRLs of that trust domain (PEM "X509 CRL" blocks)

With --jwt-audience it also keeps a JWT-SVID for those audiences, renewed
at half its life (spiffe-helper's jwt_svids and jwt_bundle_file_name):

  jwt_svid.token   the token, mode 0600
  jwt_bundle.json  the JWT bundle (JWKS) to validate such tokens

Each file is replaced atomically (written to a temporary file in --dir,
flushed, renamed), so a reader never sees a partial file. Once all three are
in place the helper runs --reload-cmd with "sh -c", or sends --signal to the
process whose pid --pid-file holds (read anew each time). It repeats on every
update: each renewal of the SVID and each change of the bundle, until it is
stopped (SIGTERM, Ctrl-C). With --once it writes, reloads and exits.
What the reload command prints is logged with its "reloaded" line.

The identity is the helper's own: the server knows callers by the socket's
peer credentials, so run the helper as the user (or in the container) a
registration entry names.`,
		Example: `  meshid helper --dir /etc/nginx/tls --reload-cmd 'nginx -s reload'
  meshid helper --dir /var/lib/pg/tls --signal HUP --pid-file /run/postgresql/main.pid
  meshid helper --dir ./certs --once`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(cmd.ErrOrStderr(), logLevel, logFormat)
			if err != nil {
				return err
			}
			c.Log = log
			if err := applySpiffeEndpointSocket(cmd.Flags(), "socket"); err != nil {
				return err
			}
			return helper.Run(cmd.Context(), c)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&c.Socket, "socket", endpoint.DefaultLayout().Socket, "the SPIFFE Workload API socket (path or unix:// address; default $SPIFFE_ENDPOINT_SOCKET when set)")
	fs.StringVar(&c.Dir, "dir", "", "directory to write the files into; created if absent (required)")
	fs.StringVar(&c.CertName, "cert-name", helper.DefaultCertName, "file name of the SVID chain in --dir")
	fs.StringVar(&c.KeyName, "key-name", helper.DefaultKeyName, "file name of the private key in --dir")
	fs.StringVar(&c.BundleName, "bundle-name", helper.DefaultBundleName, "file name of the trust bundle in --dir")
	fs.StringVar(&c.CRLName, "crl-name", helper.DefaultCRLName, "file name of the CRLs in --dir")
	fs.StringSliceVar(&c.JWTAudience, "jwt-audience", nil, "also keep a JWT-SVID for this audience (repeat or comma-separate for several in one token)")
	fs.StringVar(&c.JWTSVIDName, "jwt-svid-file-name", helper.DefaultJWTSVIDName, "file name of the JWT-SVID in --dir (with --jwt-audience)")
	fs.StringVar(&c.JWTBundleName, "jwt-bundle-file-name", helper.DefaultJWTBundleName, "file name of the JWT bundle in --dir (with --jwt-audience)")
	fs.StringVar(&c.ReloadCmd, "reload-cmd", "", `command run with "sh -c" after every write, e.g. 'nginx -s reload'`)
	fs.StringVar(&c.Signal, "signal", "", "signal sent after every write to the pid in --pid-file, e.g. HUP")
	fs.StringVar(&c.PIDFile, "pid-file", "", "file holding the pid to signal (with --signal)")
	fs.BoolVar(&c.Once, "once", false, "write the files once (and reload), then exit")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	logFormatFlag(fs, &logFormat)
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}
