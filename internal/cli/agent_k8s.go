package cli

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/pflag"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/kube"
	"github.com/meshid/meshid/kube/podattest"
)

// agentK8sFlags are the agent's workload-attestation flags for Kubernetes.
type agentK8sFlags struct {
	kubeconfig, nodeName, procRoot string
	workloadAttestor               bool
}

func addAgentK8sFlags(fs *pflag.FlagSet) *agentK8sFlags {
	f := &agentK8sFlags{}
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file for the API server (default: in-cluster when run in a pod, else no Kubernetes)")
	fs.StringVar(&f.nodeName, "node-name", "", "this node's name, whose pods the k8s workload attestor watches (default $NODE_NAME, from the downward API)")
	fs.StringVar(&f.procRoot, "proc-root", podattest.DefaultProcRoot, "procfs the callers' cgroups are read from (the host's: the agent needs hostPID)")
	fs.BoolVar(&f.workloadAttestor, "k8s-workload-attestor", false, "attest callers in this node's pods as their pod (k8s:* selectors) from a pod informer (default: on when Kubernetes is configured)")
	return f
}

// configure sets cfg.Pods when the k8s workload attestor is to run: when
// asked for, or by default when Kubernetes is configured (a kubeconfig, or
// running in a pod). Asked for without Kubernetes, or without the node's
// name, is an error.
func (f *agentK8sFlags) configure(fs *pflag.FlagSet, cfg *agent.Config, log *slog.Logger) error {
	asked := fs.Changed("k8s-workload-attestor")
	if asked && !f.workloadAttestor {
		return nil
	}
	rc, err := kube.Config(f.kubeconfig)
	switch {
	case errors.Is(err, kube.ErrNotConfigured) && !asked:
		return nil
	case errors.Is(err, kube.ErrNotConfigured):
		return fmt.Errorf("--k8s-workload-attestor: %w (give --kubeconfig)", err)
	case err != nil:
		return err
	}
	node, err := kube.NodeName(f.nodeName)
	if err != nil {
		return fmt.Errorf("k8s workload attestor: %w", err)
	}
	client, err := kube.Client(rc)
	if err != nil {
		return err
	}
	cfg.Pods = &podattest.Config{Client: client, NodeName: node, ProcRoot: f.procRoot, Logger: log}
	return nil
}
