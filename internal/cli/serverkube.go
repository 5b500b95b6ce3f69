package cli

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/kube"
	"github.com/meshid/meshid/kube/bundlecm"
	"github.com/meshid/meshid/kube/nodepods"
	"github.com/meshid/meshid/kube/psat"
)

// serverKubeFlags are the server's Kubernetes settings: node attestation
// of agents with projected service-account tokens, default pod
// identities, and the trust bundle in a ConfigMap.
type serverKubeFlags struct {
	// signer is set when the pod certificate signer runs (serverpcr.go):
	// Kubernetes is in use even without any setting here.
	signer bool

	kubeconfig      string
	cluster         string
	audience        string
	agentSAs        []string
	defaultIdentity bool
	excludeNS       []string
	bundleConfigMap string
	namespace       string
	trust           serverTrustFlags
}

func (k *serverKubeFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig of the Kubernetes API server (default: the in-cluster configuration when running in a pod; neither: no Kubernetes)")
	fs.StringVar(&k.cluster, "k8s-cluster", "cluster", "name of this Kubernetes cluster in agents' IDs (spiffe://<td>/meshid/agent/k8s_psat/<cluster>/<node-uid>) and k8s_psat:cluster: selectors")
	fs.StringVar(&k.audience, "k8s-token-audience", "meshid", "audience agents' projected service-account tokens must carry")
	fs.StringArrayVar(&k.agentSAs, "k8s-agent-service-account", nil, "NAMESPACE/NAME of a service account whose pods may attest as node agents (k8s_psat); repeatable, e.g. meshid/meshid-agent")
	fs.BoolVar(&k.defaultIdentity, "k8s-default-identity", false, "give every pod spiffe://<td>/ns/<namespace>/sa/<serviceaccount> from the agent on its node, with no entry; an entry naming that SPIFFE ID replaces the default")
	fs.StringArrayVar(&k.excludeNS, "k8s-exclude-namespace", nil, "namespace whose pods get no default identity and that gets no --k8s-ca-configmap-name; repeatable")
	fs.StringVar(&k.bundleConfigMap, "k8s-bundle-configmap", "", "ConfigMap in --k8s-namespace the server keeps its trust bundle in (key bundle.pem), for agents to verify it on first contact; off when empty")
	fs.StringVar(&k.namespace, "k8s-namespace", "", "the server's namespace (default $POD_NAMESPACE, else the pod's service-account namespace)")
	k.trust.register(fs)
}

// used reports whether any Kubernetes setting asks for the API server.
func (k *serverKubeFlags) used() bool {
	return len(k.agentSAs) > 0 || k.defaultIdentity || k.bundleConfigMap != ""
}

// kubeRun is what the server runs for Kubernetes next to itself.
type kubeRun struct {
	pods  *nodepods.Index
	pub   *bundlecm.Publisher
	trust []publisher
	srv   atomic.Pointer[controlplane.Server]
}

// setup connects to the API server when a setting needs it and fills cfg.
// It returns nil when Kubernetes is not used.
func (k *serverKubeFlags) setup(cfg *controlplane.Config, log *slog.Logger) (*kubeRun, error) {
	// The trust publishers are on by default, so they alone do not turn
	// Kubernetes on, but a --kubeconfig with only them is enough.
	if !k.used() && !k.signer && (k.kubeconfig == "" || !k.trust.on()) {
		if k.kubeconfig != "" {
			return nil, errors.New("--kubeconfig given, but no Kubernetes setting uses it: add --k8s-agent-service-account, --k8s-default-identity or --k8s-bundle-configmap")
		}
		return nil, nil
	}
	if k.defaultIdentity && len(k.agentSAs) == 0 {
		return nil, errors.New("--k8s-default-identity needs agents attested by Kubernetes: add --k8s-agent-service-account NAMESPACE/NAME")
	}
	rc, err := kube.Config(k.kubeconfig)
	if errors.Is(err, kube.ErrNotConfigured) {
		return nil, errors.New("Kubernetes settings given, but no --kubeconfig and not running in a pod")
	}
	if err != nil {
		return nil, err
	}
	client, err := kube.Client(rc)
	if err != nil {
		return nil, err
	}
	kr := &kubeRun{}
	if len(k.agentSAs) > 0 {
		v, err := psat.New(psat.Config{Client: client, Cluster: k.cluster, Audience: k.audience, ServiceAccounts: k.agentSAs})
		if err != nil {
			return nil, err
		}
		cfg.NodeAttestors = append(cfg.NodeAttestors, v)
	}
	if k.defaultIdentity {
		kr.pods = nodepods.New(client, log, func(node string) {
			if s := kr.srv.Load(); s != nil {
				s.NodeWorkloadsChanged(node)
			}
		})
		cfg.DefaultIdentities = kr.pods
		cfg.ExcludeNamespaces = k.excludeNS
	}
	if k.bundleConfigMap != "" {
		ns, err := k.ownNamespace()
		if err != nil {
			return nil, err
		}
		kr.pub = bundlecm.New(client, ns, k.bundleConfigMap, func() []byte {
			if s := kr.srv.Load(); s != nil {
				return s.BundlePEM()
			}
			return nil
		}, log)
		addBundleHook(cfg, kr.pub.Kick)
	}
	kr.trust, err = k.trust.setup(rc, cfg, k.excludeNS, func() []byte {
		if s := kr.srv.Load(); s != nil {
			return s.BundlePEM()
		}
		return nil
	}, log)
	if err != nil {
		if kr.pub != nil {
			kr.pub.Close() // its queue's goroutines would outlive the failed start
		}
		return nil, err
	}
	return kr, nil
}

// ownNamespace is the server's namespace.
func (k *serverKubeFlags) ownNamespace() (string, error) {
	if k.namespace != "" {
		return k.namespace, nil
	}
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns, nil
	}
	if b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace"); err == nil && len(b) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	return "", errors.New("--k8s-bundle-configmap: the server's namespace is unknown: pass --k8s-namespace or set POD_NAMESPACE (downward API: metadata.namespace)")
}

// podSyncTimeout bounds the first list of pods: the agent API must not
// serve before it, or agents would be told their pods have no identity.
const podSyncTimeout = time.Minute

// start runs the informers and publisher for srv until ctx ends, once the
// pods are listed; the returned wait blocks until they have stopped.
func (kr *kubeRun) start(ctx context.Context, srv *controlplane.Server) (wait func(), err error) {
	kr.srv.Store(srv)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	wait = func() { cancel(); wg.Wait() }
	if kr.pods != nil {
		wg.Go(func() { kr.pods.Run(ctx) })
		if err := kr.pods.WaitSynced(ctx, podSyncTimeout); err != nil {
			wait()
			return nil, err
		}
	}
	if kr.pub != nil {
		wg.Go(func() { kr.pub.Run(ctx) })
		kr.pub.Kick()
	}
	for _, p := range kr.trust {
		wg.Go(func() { p.Run(ctx) })
		p.Kick()
	}
	return wait, nil
}

// The seams the server consumes.
var (
	_ attest.NodeAttestor        = (*psat.Verifier)(nil)
	_ controlplane.NodeWorkloads = (*nodepods.Index)(nil)
)
