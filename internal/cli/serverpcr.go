package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/kube"
	"github.com/meshid/meshid/kube/pcrsigner"
)

// serverPCRFlags configure the Kubernetes pod certificate signer
// (PodCertificateRequests, KEP-4317).
type serverPCRFlags struct {
	signerName string
	allowNS    []string
	excludeNS  []string
}

func (p *serverPCRFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&p.signerName, "pcr-signer-name", "", "sign Kubernetes PodCertificateRequests for this signer name (e.g. "+pcrsigner.DefaultSignerName+"; pods get spiffe://<td>/ns/<namespace>/sa/<serviceaccount>); off when empty; needs --kubeconfig or running in a pod")
	fs.StringArrayVar(&p.allowNS, "pcr-allow-namespace", nil, "namespace whose pods may get pod certificates (repeatable; default: all); others are Denied")
	fs.StringArrayVar(&p.excludeNS, "pcr-exclude-namespace", nil, "namespace whose pods are Denied pod certificates; repeatable")
}

func (p *serverPCRFlags) on() bool { return p.signerName != "" }

// pcrQPS is the signer's own client rate: client-go's default 5 QPS would
// make a kubelet-restart storm of 1,000 requests take over 3 minutes.
const pcrQPS, pcrBurst = 200, 400

// setup builds the signer (nil when off); start runs it.
func (p *serverPCRFlags) setup(kubeconfig string, log *slog.Logger) (*pcrRun, error) {
	if !p.on() {
		if len(p.allowNS) > 0 || len(p.excludeNS) > 0 {
			return nil, errors.New("--pcr-allow-namespace/--pcr-exclude-namespace given without --pcr-signer-name")
		}
		return nil, nil
	}
	name := p.signerName
	if err := pcrsigner.CheckSignerName(name); err != nil {
		return nil, fmt.Errorf("--pcr-signer-name: %w", err)
	}
	rc, err := kube.Config(kubeconfig)
	if errors.Is(err, kube.ErrNotConfigured) {
		return nil, errors.New("--pcr-signer-name given, but no --kubeconfig and not running in a pod")
	}
	if err != nil {
		return nil, err
	}
	rc = rest.CopyConfig(rc)
	rc.QPS, rc.Burst = pcrQPS, pcrBurst
	client, err := kube.Client(rc)
	if err != nil {
		return nil, err
	}
	return &pcrRun{cfg: pcrsigner.Config{Client: client, SignerName: name, AllowNamespaces: p.allowNS, ExcludeNamespaces: p.excludeNS, Log: log}}, nil
}

// pcrRun is the pod certificate signer the server runs.
type pcrRun struct {
	cfg pcrsigner.Config
}

// start runs the signer for srv (only while srv leads, its metrics in
// srv's registry) until ctx ends; wait blocks until it has stopped.
func (r *pcrRun) start(ctx context.Context, srv *controlplane.Server) (wait func(), err error) {
	cfg := r.cfg
	cfg.Sign, cfg.Leading, cfg.Registerer = srv.SignPodCertificate, srv.Leading, srv.Metrics().Registry
	s, err := pcrsigner.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("pod certificate signer: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { s.Run(ctx) })
	return func() { cancel(); wg.Wait() }, nil
}
