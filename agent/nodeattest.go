package agent

import (
	"bytes"
	"fmt"
	"io"
	"os"
)

// Node attestation methods (the server's attest.NodeAttestor names).
const (
	MethodJoinToken = "join_token"
	MethodK8sPSAT   = "k8s_psat"
)

// maxTokenFile bounds the projected token read from disk: about 1 KiB in
// practice; a huge file there is not one.
const maxTokenFile = 64 << 10

// canAttest reports whether the agent can attest again after an eviction:
// with a join token, or with a service-account token that the kubelet
// keeps fresh.
func (a *Agent) canAttest() bool {
	return a.cfg.NodeAttestor == MethodK8sPSAT || a.cfg.JoinToken != ""
}

// nodeProof is the payload of an attestation by the configured method.
func (a *Agent) nodeProof() ([]byte, error) {
	if a.cfg.NodeAttestor != MethodK8sPSAT {
		return []byte(a.cfg.JoinToken), nil
	}
	f, err := os.Open(a.cfg.K8sTokenPath)
	if err != nil {
		return nil, fmt.Errorf("service-account token: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err != nil {
		return nil, fmt.Errorf("service-account token %s: %w", a.cfg.K8sTokenPath, err)
	}
	if len(b) > maxTokenFile {
		return nil, fmt.Errorf("service-account token %s is over %d bytes: not a projected token", a.cfg.K8sTokenPath, maxTokenFile)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil, fmt.Errorf("service-account token %s is empty", a.cfg.K8sTokenPath)
	}
	return b, nil
}
