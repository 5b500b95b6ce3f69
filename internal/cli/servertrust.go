package cli

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/kube"
	"github.com/meshid/meshid/kube/trustpublish"
)

// serverTrustFlags publish the trust bundle to workloads that read it from
// the Kubernetes API: ClusterTrustBundles and a ConfigMap per namespace.
// Both are on by default whenever the server uses Kubernetes.
type serverTrustFlags struct {
	ctbSigner   string
	caConfigMap string
}

func (f *serverTrustFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.ctbSigner, "k8s-trust-bundle-signer", "meshid.io/spiffe", "publish the trust bundle as ClusterTrustBundles linked to this signer, one per CA, named <signer with / as :>:<trust domain>.ca-<hash> and labelled meshid.io/trust-domain=<trust domain> (mount with a clusterTrustBundle projection: signerName + labelSelector); off when empty")
	fs.StringVar(&f.caConfigMap, "k8s-ca-configmap-name", "meshid-ca-root-cert", "ConfigMap (key ca.crt) the server keeps equal to its trust bundle in every namespace but the --k8s-exclude-namespace ones; off when empty")
}

// on reports whether a publisher is asked for.
func (f *serverTrustFlags) on() bool { return f.ctbSigner != "" || f.caConfigMap != "" }

// trustQPS is the publishers' own client budget: a bundle change writes one
// ConfigMap per namespace, and client-go's default (5/s, burst 10) would
// take 20 s for 100 namespaces.
const (
	trustQPS   = 100
	trustBurst = 200
)

// publisher is what kubeRun runs for the trust bundle.
type publisher interface {
	Run(ctx context.Context)
	Kick()
}

// setup makes the publishers the flags ask for; bundle is read on every
// reconcile.
func (f *serverTrustFlags) setup(rc *rest.Config, cfg *controlplane.Config, exclude []string, bundle func() []byte, log *slog.Logger) ([]publisher, error) {
	if !f.on() {
		return nil, nil
	}
	rc = rest.CopyConfig(rc)
	rc.QPS, rc.Burst = trustQPS, trustBurst
	client, err := kube.Client(rc)
	if err != nil {
		return nil, err
	}
	var out []publisher
	if f.ctbSigner != "" {
		td := cfg.TrustDomain
		if td == "" {
			td = controlplane.DefaultTrustDomain
		}
		b, err := trustpublish.NewBundles(trustpublish.BundlesConfig{Client: client, SignerName: f.ctbSigner, TrustDomain: td, Bundle: bundle,
			Log: log.With("publisher", "clustertrustbundles")})
		if err != nil {
			return nil, fmt.Errorf("--k8s-trust-bundle-signer: %w", err)
		}
		out = append(out, b)
	}
	if f.caConfigMap != "" {
		out = append(out, trustpublish.NewConfigMaps(trustpublish.ConfigMapsConfig{Client: client, Name: f.caConfigMap, Exclude: exclude, Bundle: bundle,
			Log: log.With("publisher", "ca-configmaps")}))
	}
	for _, p := range out {
		addBundleHook(cfg, p.Kick)
	}
	return out, nil
}

// addBundleHook adds f to what the server calls when its bundle changes.
func addBundleHook(cfg *controlplane.Config, f func()) {
	prev := cfg.OnBundleChange
	if prev == nil {
		cfg.OnBundleChange = f
		return
	}
	cfg.OnBundleChange = func() { prev(); f() }
}
