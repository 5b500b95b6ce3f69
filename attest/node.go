package attest

import (
	"context"
	"errors"
)

// Node attestation: how a node agent proves to the server which node it
// runs on (meshid agent's Attest call). A NodeAttestor checks one method's
// proof on the server; the join token, which needs the server's store, is
// built into the server, and every other method plugs in here.

// ErrNodeRefused marks a proof that was checked and is not good: a wrong
// audience, a deleted pod, an untrusted service account. The agent gets
// PermissionDenied with the wrapped reason; any other error (the API
// server unreachable) is Unavailable, and the agent retries.
var ErrNodeRefused = errors.New("node attestation refused")

// NodeClaim is what a checked proof establishes about the node.
type NodeClaim struct {
	// Path are the SPIFFE ID path segments after the method's in the
	// agent's ID: spiffe://<td>/meshid/agent/<method>/<Path...>. They must
	// name the node for as long as it exists and never another node.
	Path []string
	// Node is the node's name, for operators and for what the server
	// hands the agent (the Kubernetes node name).
	Node string
	// Selectors describe the node ("k8s_psat:node-name:web-1").
	Selectors []string
}

// NodeAttestor checks one attestation method's proof.
type NodeAttestor interface {
	// Method is the method's name in AttestRequest.method ("k8s_psat").
	Method() string
	// Attest checks payload; a bad proof is an error wrapping
	// ErrNodeRefused.
	Attest(ctx context.Context, payload []byte) (NodeClaim, error)
}
