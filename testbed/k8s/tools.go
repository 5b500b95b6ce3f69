//go:build tools

// Package k8sbin only records the three commands this module builds, so that
// `go mod tidy` keeps them in the module graph.
package k8sbin

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
