package envoyconfig

import "github.com/spf13/pflag"

// AddFlags registers the flags of `meshid envoy bootstrap` on fs, bound to o.
// defaultSocket is the default of --socket (meshid's workload socket). The
// flags live here, next to Options, so the tests can replay the commands
// recorded in deploy/envoy/README.md with exactly the CLI's flags.
func (o *Options) AddFlags(fs *pflag.FlagSet, defaultSocket string) {
	fs.StringVar(&o.SpiffeID, "spiffe-id", "", "SPIFFE ID of this sidecar's workload (required)")
	fs.StringVar(&o.Socket, "socket", defaultSocket, "meshid's workload socket (SDS), as Envoy's process sees it")
	fs.StringArrayVar(&o.Upstreams, "upstream", nil, "SPIFFE-ID=host:port[@localport] of a service to reach over mTLS (repeatable)")
	fs.StringVar(&o.Listen, "listen", DefaultListen, "ip:port of the inbound mTLS listener")
	fs.StringVar(&o.LocalApp, "local-app", DefaultLocalApp, "host:port of the app that inbound connections go to")
	fs.StringVar(&o.NodeID, "node-id", "", `Envoy node id (default: from the SPIFFE ID's path, "sa.ns" for /ns/<ns>/sa/<sa>)`)
	fs.StringVar(&o.NodeCluster, "node-cluster", DefaultNodeCluster, "Envoy node cluster")
	fs.StringVar(&o.Admin, "admin", DefaultAdmin, `ip:port of Envoy's admin interface ("" for none)`)
	fs.StringVar((*string)(&o.Validation), "validation", string(ValidationDefault),
		`how peers are validated: default (SDS secret "ROOTCA") or spiffe ("ALL", Envoy's SPIFFE validator)`)
}
