package envoyconfig

import (
	"bytes"
	"fmt"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	sigsyaml "sigs.k8s.io/yaml"
)

// Generate returns the bootstrap for o as commented YAML. The YAML is parsed
// back strictly (Parse) and must equal the validated proto.
func Generate(o Options) ([]byte, error) {
	p, err := o.plan()
	if err != nil {
		return nil, err
	}
	b, err := p.build()
	if err != nil {
		return nil, err
	}
	out, err := Marshal(b, p.header())
	if err != nil {
		return nil, err
	}
	back, err := Parse(out)
	if err != nil {
		return nil, fmt.Errorf("generated YAML does not parse back: %w", err)
	}
	if !proto.Equal(back, b) {
		return nil, fmt.Errorf("generated YAML does not parse back to the bootstrap it was made from")
	}
	return out, nil
}

// Parse reads a bootstrap from YAML (or JSON) the strict way: unknown fields
// and typed_config types that are not linked in are errors.
func Parse(y []byte) (*bootstrapv3.Bootstrap, error) {
	j, err := sigsyaml.YAMLToJSON(y)
	if err != nil {
		return nil, fmt.Errorf("yaml: %w", err)
	}
	b := &bootstrapv3.Bootstrap{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(j, b); err != nil {
		return nil, err
	}
	return b, nil
}

// fetchTimeoutComment is put next to every initial_fetch_timeout.
const fetchTimeoutComment = "no deadline: stay warming until meshid sends the secret"

// Marshal renders b as YAML with proto field names, in proto field order,
// under the given head comment (lines without "#").
func Marshal(b *bootstrapv3.Bootstrap, head string) ([]byte, error) {
	j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return nil, err
	}
	// JSON is YAML: decoding it into a node tree keeps the key order.
	var doc yaml.Node
	if err := yaml.Unmarshal(j, &doc); err != nil {
		return nil, err
	}
	blockStyle(&doc)
	if head != "" {
		doc.HeadComment = head
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// blockStyle drops the JSON (flow, double-quoted) styles so the encoder
// writes block YAML and quotes a string only where YAML needs it, and
// annotates initial_fetch_timeout.
func blockStyle(n *yaml.Node) {
	n.Style = 0
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == "initial_fetch_timeout" {
				n.Content[i+1].LineComment = fetchTimeoutComment
			}
		}
	}
	for _, c := range n.Content {
		blockStyle(c)
	}
}

func (p *plan) header() string {
	validation := fmt.Sprintf("%q (the trust bundle as trusted_ca)", SecretRootCA)
	if p.validation == ValidationSPIFFE {
		validation = fmt.Sprintf("%q (every trust domain's bundle, checked by Envoy's SPIFFE validator)", SecretAll)
	}
	lines := []string{
		"Envoy v3 bootstrap for a meshid sidecar, made by `meshid envoy bootstrap`.",
		"",
		"Identity: " + p.id.String(),
		"Certificates come over SDS from meshid on the unix socket " + p.socket + ".",
		"meshid tells callers apart by the socket's peer credentials, so the socket",
		"must be reachable from Envoy's process, and Envoy must run as the user (or",
		"in the pod) that a registration entry for this identity names.",
		"",
		fmt.Sprintf("Secrets: %q = this sidecar's X.509-SVID; peers are validated with", SecretDefault),
		validation + ".",
		"Every SDS config source sets initial_fetch_timeout: 0s. With Envoy's default",
		"(15s) a listener or cluster whose secret has not arrived goes live without a",
		"certificate and refuses every connection; with 0s it keeps warming until",
		"meshid delivers the secret, so this proxy never serves without certificates.",
	}
	return strings.Join(lines, "\n")
}
