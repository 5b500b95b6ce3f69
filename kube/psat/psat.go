// Package psat is the server's check of a node agent's projected
// service-account token (method k8s_psat, as SPIRE's k8s_psat and Istio's
// CSR authentication): the kubelet mounts a token bound to the agent's pod
// with audience meshid, the agent presents it, and the API server says,
// through a TokenReview, whose it is, that it is still valid and which pod
// and node it is bound to. The server then requires a service account it
// trusts and checks the pod really runs on that node.
package psat

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"

	authnv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/attest"
)

// Method is the attestation method's name.
const Method = "k8s_psat"

// MaxTokenSize bounds a presented token: projected tokens are about 1 KiB;
// anything much larger is not one and is not sent on to the API server.
const MaxTokenSize = 16 << 10

// The extra fields of a TokenReview's user for a pod-bound token.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
	extraNodeUID  = "authentication.kubernetes.io/node-uid"
)

// Config configures a Verifier.
type Config struct {
	// Client talks to the API server (TokenReview create; pods and nodes
	// get).
	Client kubernetes.Interface
	// Cluster names the cluster in agent IDs and selectors.
	Cluster string
	// Audience the token must carry (default "meshid").
	Audience string
	// ServiceAccounts are the agents' service accounts, "namespace/name";
	// a token of any other is refused.
	ServiceAccounts []string
}

// Verifier checks k8s_psat proofs. It implements attest.NodeAttestor.
type Verifier struct {
	cfg     Config
	trusted map[string]bool
}

// clusterPattern is what a cluster name may be: one SPIFFE ID path segment
// and one selector value.
var clusterPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// New checks cfg and returns a Verifier.
func New(cfg Config) (*Verifier, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("k8s_psat: no Kubernetes client")
	}
	if !clusterPattern.MatchString(cfg.Cluster) {
		return nil, fmt.Errorf("cluster name %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", cfg.Cluster)
	}
	if cfg.Audience == "" {
		cfg.Audience = "meshid"
	}
	if len(cfg.ServiceAccounts) == 0 {
		return nil, fmt.Errorf("k8s_psat: no agent service account is trusted: give --k8s-agent-service-account NAMESPACE/NAME (the agent DaemonSet's)")
	}
	v := &Verifier{cfg: cfg, trusted: map[string]bool{}}
	for _, sa := range cfg.ServiceAccounts {
		ns, name, ok := strings.Cut(sa, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return nil, fmt.Errorf("agent service account %q: want NAMESPACE/NAME", sa)
		}
		v.trusted[sa] = true
	}
	return v, nil
}

// Method implements attest.NodeAttestor.
func (v *Verifier) Method() string { return Method }

// Node is what a good token establishes.
type Node struct {
	Cluster, NodeName, NodeUID string
	AgentNamespace, AgentSA    string
	PodName, PodUID            string
}

// Selectors are the node's selectors, sorted.
func (n Node) Selectors() []string {
	s := []string{
		"k8s_psat:agent-ns:" + n.AgentNamespace,
		"k8s_psat:agent-sa:" + n.AgentSA,
		"k8s_psat:cluster:" + n.Cluster,
		"k8s_psat:node-name:" + n.NodeName,
		"k8s_psat:node-uid:" + n.NodeUID,
	}
	slices.Sort(s)
	return s
}

// Attest implements attest.NodeAttestor.
func (v *Verifier) Attest(ctx context.Context, payload []byte) (attest.NodeClaim, error) {
	n, err := v.Verify(ctx, string(payload))
	if err != nil {
		return attest.NodeClaim{}, err
	}
	return attest.NodeClaim{Path: []string{n.Cluster, n.NodeUID}, Node: n.NodeName, Selectors: n.Selectors()}, nil
}

func refused(format string, args ...any) error {
	return fmt.Errorf("%w: %s", attest.ErrNodeRefused, fmt.Sprintf(format, args...))
}

// Verify checks token: the API server must authenticate it for the
// audience, as a trusted service account's, bound to a pod that still
// exists, runs on the node the token names, and a node that is still the
// one the token was minted on (a node deleted and re-created under the
// same name has another UID).
func (v *Verifier) Verify(ctx context.Context, token string) (Node, error) {
	token = strings.TrimSpace(token)
	switch {
	case token == "":
		return Node{}, refused("empty token")
	case len(token) > MaxTokenSize:
		return Node{}, refused("token of %d bytes is no service-account token (at most %d)", len(token), MaxTokenSize)
	}
	tr, err := v.cfg.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{v.cfg.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Node{}, fmt.Errorf("token review: %w", err)
	}
	st := tr.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "not authenticated"
		}
		return Node{}, refused("the API server does not accept the token for audience %q: %s", v.cfg.Audience, why)
	}
	if !slices.Contains(st.Audiences, v.cfg.Audience) {
		return Node{}, refused("token is not for audience %q", v.cfg.Audience)
	}
	ns, sa, ok := serviceAccount(st.User.Username)
	if !ok {
		return Node{}, refused("token of %q is no service account's", st.User.Username)
	}
	if !v.trusted[ns+"/"+sa] {
		return Node{}, refused("service account %s/%s is not trusted to attest nodes (--k8s-agent-service-account)", ns, sa)
	}
	n := Node{Cluster: v.cfg.Cluster, AgentNamespace: ns, AgentSA: sa,
		PodName: one(st.User.Extra, extraPodName), PodUID: one(st.User.Extra, extraPodUID),
		NodeName: one(st.User.Extra, extraNodeName), NodeUID: one(st.User.Extra, extraNodeUID)}
	switch {
	case n.PodName == "" || n.PodUID == "":
		return Node{}, refused("token is bound to no pod: mount a projected serviceAccountToken in the agent's pod")
	case n.NodeName == "" || n.NodeUID == "":
		return Node{}, refused("token names no node (was the pod scheduled when it was minted?)")
	}
	pod, err := v.cfg.Client.CoreV1().Pods(ns).Get(ctx, n.PodName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return Node{}, refused("pod %s/%s the token is bound to no longer exists", ns, n.PodName)
	case err != nil:
		return Node{}, fmt.Errorf("get pod %s/%s: %w", ns, n.PodName, err)
	case string(pod.UID) != n.PodUID:
		return Node{}, refused("pod %s/%s is not the one the token is bound to (uid %s, not %s)", ns, n.PodName, pod.UID, n.PodUID)
	case pod.Spec.NodeName != n.NodeName:
		return Node{}, refused("pod %s/%s runs on node %q, not %q as the token says", ns, n.PodName, pod.Spec.NodeName, n.NodeName)
	case pod.Spec.ServiceAccountName != sa:
		return Node{}, refused("pod %s/%s runs as service account %q, not %q", ns, n.PodName, pod.Spec.ServiceAccountName, sa)
	}
	node, err := v.cfg.Client.CoreV1().Nodes().Get(ctx, n.NodeName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return Node{}, refused("node %q no longer exists", n.NodeName)
	case err != nil:
		return Node{}, fmt.Errorf("get node %s: %w", n.NodeName, err)
	case string(node.UID) != n.NodeUID:
		return Node{}, refused("node %q is not the one the token was minted on (uid %s, not %s)", n.NodeName, node.UID, n.NodeUID)
	}
	return n, nil
}

// serviceAccount parses system:serviceaccount:NS:NAME.
func serviceAccount(user string) (ns, name string, ok bool) {
	rest, ok := strings.CutPrefix(user, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, name, ok = strings.Cut(rest, ":")
	return ns, name, ok && ns != "" && name != ""
}

func one(extra map[string]authnv1.ExtraValue, key string) string {
	if v := extra[key]; len(v) == 1 {
		return v[0]
	}
	return ""
}
