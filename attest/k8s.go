package attest

import (
	"context"
	"fmt"
	"strings"
)

// K8sName is the name of the k8s workload attestor (kube/podattest), which
// produces the K8sKinds.
const K8sName = "k8s"

// k8sKinds are the kinds of the k8s workload attestor, each with a check
// of the form Kubernetes itself enforces on what it names: an entry keyed
// on anything else could never match a pod.
var k8sKinds = []Kind{
	{Type: "k8s", Key: "ns", Value: "NAMESPACE", Check: dnsLabel},
	{Type: "k8s", Key: "sa", Value: "SERVICEACCOUNT", Check: dnsSubdomain},
	{Type: "k8s", Key: "pod-name", Value: "NAME", Check: dnsSubdomain},
	{Type: "k8s", Key: "pod-uid", Value: "UID", Check: podUID},
	{Type: "k8s", Key: "pod-label", Value: "KEY:VALUE", Check: podLabel},
	{Type: "k8s", Key: "container-name", Value: "NAME", Check: dnsLabel},
	{Type: "k8s", Key: "container-image", Value: "IMAGE", Check: image},
	{Type: "k8s", Key: "node-name", Value: "NODE", Check: dnsSubdomain},
}

// K8sKinds returns the kinds of the k8s workload attestor: k8s:ns, k8s:sa,
// k8s:pod-name, k8s:pod-uid, k8s:pod-label (KEY:VALUE), k8s:container-name,
// k8s:container-image and k8s:node-name.
func K8sKinds() []Kind { return k8sKinds }

// K8sDeclared declares the k8s workload attestor's kinds without attesting
// anything: the server runs no pods' attestation (the node agents do), but
// the entries it stores and pushes to them name these kinds, so it must
// accept and check them. Its Attest returns no selectors: a caller of the
// server's own workload socket is never taken for a pod.
type K8sDeclared struct{}

// Name implements Attestor.
func (K8sDeclared) Name() string { return K8sName }

// Kinds implements Attestor.
func (K8sDeclared) Kinds() []Kind { return k8sKinds }

// Attest implements Attestor: nothing.
func (K8sDeclared) Attest(context.Context, PeerCred) ([]string, error) { return nil, nil }

// dnsLabel checks an RFC 1123 label, as Kubernetes requires of namespace
// and container names: at most 63 lowercase letters, digits and '-',
// starting and ending alphanumeric.
func dnsLabel(v string) error {
	if !isDNSLabel(v) {
		return fmt.Errorf("%q is not a DNS-1123 label (at most 63 of a-z, 0-9 and '-', starting and ending alphanumeric)", v)
	}
	return nil
}

func isDNSLabel(v string) bool {
	if v == "" || len(v) > 63 || v[0] == '-' || v[len(v)-1] == '-' {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

// dnsSubdomain checks an RFC 1123 subdomain, as Kubernetes requires of pod,
// service-account and node names: at most 253 characters, dot-separated
// labels.
func dnsSubdomain(v string) error {
	if !isDNSSubdomain(v) {
		return fmt.Errorf("%q is not a DNS-1123 subdomain (at most 253 characters, dot-separated labels of a-z, 0-9 and '-')", v)
	}
	return nil
}

func isDNSSubdomain(v string) bool {
	if v == "" || len(v) > 253 {
		return false
	}
	for l := range strings.SplitSeq(v, ".") {
		if !isDNSLabel(l) {
			return false
		}
	}
	return true
}

// podUID checks a pod's UID: the API server makes them as lowercase UUIDs
// (static pods' are 32 hex digits), never anything but hex and dashes.
func podUID(v string) error {
	if v == "" || len(v) > 64 || strings.Trim(v, "0123456789abcdef-") != "" {
		return fmt.Errorf("%q is not a pod UID (lowercase hex and '-', e.g. 6f1c2b0e-1d2a-4c3b-9e8f-0a1b2c3d4e5f)", v)
	}
	return nil
}

// podLabel checks KEY:VALUE, a label key (an optional DNS-subdomain prefix
// and '/', then a name) and a label value (possibly empty), as Kubernetes
// validates labels. A key holds no ':', so the first ':' splits them.
func podLabel(v string) error {
	key, val, ok := strings.Cut(v, ":")
	if !ok {
		return fmt.Errorf("%q is not KEY:VALUE (e.g. app:web; an empty value is app:)", v)
	}
	name := key
	if prefix, n, hasPrefix := strings.Cut(key, "/"); hasPrefix {
		if !isDNSSubdomain(prefix) {
			return fmt.Errorf("label key %q: prefix %q is not a DNS-1123 subdomain", key, prefix)
		}
		name = n
	}
	if name == "" || !isLabelValue(name) {
		return fmt.Errorf("label key %q is not a qualified name (at most 63 of A-Z, a-z, 0-9, '-', '_', '.', starting and ending alphanumeric, with an optional DNS prefix and '/')", key)
	}
	if !isLabelValue(val) {
		return fmt.Errorf("label value %q is not valid (at most 63 of A-Z, a-z, 0-9, '-', '_', '.', starting and ending alphanumeric, or empty)", val)
	}
	return nil
}

// isLabelValue checks a label value, which is also the form of a label
// key's name part (then not empty).
func isLabelValue(v string) bool {
	if v == "" {
		return true
	}
	if len(v) > 63 || !isAlnum(v[0]) || !isAlnum(v[len(v)-1]) {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; !isAlnum(c) && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
}

// image checks a container image reference as a pod names it or the
// runtime reports it ("nginx:1.27", "docker.io/library/nginx@sha256:..."):
// no syntax is imposed beyond what no reference holds (space, control
// characters) and a sane length, since runtimes differ in what they
// report.
func image(v string) error {
	if v == "" || len(v) > 4096 {
		return fmt.Errorf("%q is not an image reference", v)
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c <= ' ' || c == 0x7f {
			return fmt.Errorf("image reference %q holds a space or control character", v)
		}
	}
	return nil
}
