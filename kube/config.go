// Package kube connects meshid to a Kubernetes API server the way client-go
// tools do: a kubeconfig file when one is named, else the in-cluster
// configuration (the pod's service-account token and the KUBERNETES_SERVICE_*
// variables), and the node's name from a flag or the NODE_NAME variable the
// downward API sets.
package kube

import (
	"errors"
	"fmt"
	"os"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrNotConfigured means neither a kubeconfig was named nor is this process
// running in a pod: the caller runs without Kubernetes.
var ErrNotConfigured = errors.New("no --kubeconfig and not running in a Kubernetes pod")

// UserAgent is what meshid sends the API server, so its requests can be
// told apart in audit logs and API priority and fairness.
const UserAgent = "meshid"

// Config returns the REST configuration for kubeconfig, or, when it is
// empty, the in-cluster one. Outside a pod with no kubeconfig it returns
// ErrNotConfigured.
func Config(kubeconfig string) (*rest.Config, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
			return nil, ErrNotConfigured
		}
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster Kubernetes configuration: %w", err)
		}
	}
	cfg.UserAgent = UserAgent
	return cfg, nil
}

// Client returns a clientset for cfg.
func Client(cfg *rest.Config) (kubernetes.Interface, error) {
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}

// NodeName returns flag if set, else $NODE_NAME (the DaemonSet sets it from
// spec.nodeName through the downward API).
func NodeName(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n, nil
	}
	return "", errors.New("the node's name is unknown: pass --node-name or set NODE_NAME (in a DaemonSet: valueFrom.fieldRef.fieldPath spec.nodeName)")
}
