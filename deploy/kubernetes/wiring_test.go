package kubernetes_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/envoyconfig"
	"github.com/meshid/meshid/internal/cli"
)

// These checks read the manifest files directly (no API server needed):
// what the containers are told must fit the meshid binary and each other.

const socketPath = "/run/meshid/workload/workload.sock"

// podSpecs decodes the Deployments, StatefulSets and DaemonSets of one
// manifest file, by name.
func podSpecs(t *testing.T, file string) map[string]*corev1.PodSpec {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*corev1.PodSpec{}
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		var kind struct{ Kind string }
		if err := json.Unmarshal(js, &kind); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		switch kind.Kind {
		case "Deployment":
			var o appsv1.Deployment
			mustDecode(t, file, js, &o)
			out[o.Name] = &o.Spec.Template.Spec
		case "StatefulSet":
			var o appsv1.StatefulSet
			mustDecode(t, file, js, &o)
			out[o.Name] = &o.Spec.Template.Spec
		case "DaemonSet":
			var o appsv1.DaemonSet
			mustDecode(t, file, js, &o)
			out[o.Name] = &o.Spec.Template.Spec
		}
	}
	return out
}

func mustDecode(t *testing.T, file string, js []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func containerNamed(t *testing.T, p *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range p.Containers {
		if p.Containers[i].Name == name {
			return &p.Containers[i]
		}
	}
	t.Fatalf("no container %s", name)
	return nil
}

// The server and agent containers' arguments parse as flags of the meshid
// binary: `meshid server|agent ARGS --help` parses every flag (an unknown
// one, or a bad value for a bool or number, is an error) before it prints
// help, and runs nothing. Each flag is tried alone first, so a failure
// names every flag that does not exist, then all of them together.
func TestManifestFlagsExist(t *testing.T) {
	for _, c := range []struct{ file, workload, container, cmd string }{
		{"base/server.yaml", "meshid-server", "server", "server"},
		{"base/agent.yaml", "meshid-agent", "agent", "agent"},
	} {
		t.Run(c.cmd, func(t *testing.T) {
			checkFlagsParse(t, c.file, c.cmd, containerNamed(t, podSpecs(t, c.file)[c.workload], c.container).Args)
		})
	}
}

// checkFlagsParse fails unless args (a container's, from what) start with
// the subcommand cmd and each of them, then all together, parse.
func checkFlagsParse(t *testing.T, what, cmd string, args []string) {
	t.Helper()
	help := func(args []string) (string, int) {
		var out, errb bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		code := cli.Main(ctx, append(slices.Clone(args), "--help"), &out, &errb)
		return strings.TrimSpace(errb.String()), code
	}
	if len(args) < 2 || args[0] != cmd {
		t.Fatalf("%s: args %q do not start with the subcommand %s", what, args, cmd)
	}
	var bad []string
	for _, a := range args[1:] {
		if msg, code := help([]string{cmd, a}); code != 0 {
			bad = append(bad, a+" ("+msg+")")
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%s passes flags meshid %s does not take:\n  %s", what, cmd, strings.Join(bad, "\n  "))
	}
	if msg, code := help(args); code != 0 {
		t.Fatalf("meshid %s: exit %d: %s", strings.Join(args, " "), code, msg)
	}
}

// The node socket has one path everywhere: where the agent serves, the
// host directory the agent and the examples mount, Envoy's SDS cluster and
// the go-spiffe client's address.
func TestSocketPathAgrees(t *testing.T) {
	agent := podSpecs(t, "base/agent.yaml")["meshid-agent"]
	if c := containerNamed(t, agent, "agent"); !slices.Contains(c.Args, "--socket="+socketPath) {
		t.Errorf("agent args %q lack --socket=%s", c.Args, socketPath)
	}
	hostDir := func(p *corev1.PodSpec, what string) {
		t.Helper()
		for _, v := range p.Volumes {
			if v.HostPath != nil && v.HostPath.Path == "/run/meshid/workload" {
				return
			}
		}
		t.Errorf("%s mounts no hostPath /run/meshid/workload", what)
	}
	hostDir(agent, "the agent")
	web := podSpecs(t, "examples/envoy-sidecar/web.yaml")["web"]
	hostDir(web, "the web example")
	client := podSpecs(t, "examples/go-spiffe/client.yaml")["client"]
	hostDir(client, "the go-spiffe example")
	cc := containerNamed(t, client, "client")
	if !slices.Contains(cc.Args, socketPath) {
		t.Errorf("go-spiffe client args %q do not name %s", cc.Args, socketPath)
	}
	if !slices.Contains(cc.Env, corev1.EnvVar{Name: "SPIFFE_ENDPOINT_SOCKET", Value: "unix://" + socketPath}) {
		t.Errorf("go-spiffe client has no SPIFFE_ENDPOINT_SOCKET=unix://%s", socketPath)
	}

	// The Envoy bootstrap parses strictly (every typed_config type
	// known, no unknown field), validates, and its SDS cluster is the
	// socket.
	y, err := os.ReadFile("examples/envoy-sidecar/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := envoyconfig.Parse(y)
	if err != nil {
		t.Fatalf("envoy.yaml: %v", err)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("envoy.yaml: %v", err)
	}
	validateAnys(t, b.ProtoReflect())
	var sds *clusterv3.Cluster
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == "meshid_sds" {
			sds = c
		}
	}
	if sds == nil {
		t.Fatal("envoy.yaml has no meshid_sds cluster")
	}
	pipe := sds.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe()
	if pipe.GetPath() != socketPath {
		t.Errorf("meshid_sds connects to %q, want the pipe %s", pipe.GetPath(), socketPath)
	}
	var names []string
	for _, l := range b.GetStaticResources().GetListeners() {
		walk(l.ProtoReflect(), func(m proto.Message) {
			if s, ok := m.(interface{ GetName() string }); ok && strings.HasSuffix(string(m.ProtoReflect().Descriptor().FullName()), "SdsSecretConfig") {
				names = append(names, s.GetName())
			}
		})
	}
	slices.Sort(names)
	if want := []string{"ROOTCA", "default"}; !slices.Equal(slices.Compact(names), want) {
		t.Errorf("envoy.yaml asks SDS for %v, want %v", names, want)
	}
}

// validateAnys runs ValidateAll on every message packed in an Any under m.
func validateAnys(t *testing.T, m protoreflect.Message) {
	t.Helper()
	n := 0
	walk(m, func(x proto.Message) {
		if v, ok := x.(interface{ ValidateAll() error }); ok {
			n++
			if err := v.ValidateAll(); err != nil {
				t.Errorf("%T: %v", x, err)
			}
		}
	})
	if n == 0 {
		t.Error("no typed_config validated")
	}
}

// walk calls f on every message under m, with Anys unpacked.
func walk(m protoreflect.Message, f func(proto.Message)) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return // Parse already refused unknown types
		}
		f(inner)
		walk(inner.ProtoReflect(), f)
		return
	}
	f(m.Interface())
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				walk(v.List().Get(i).Message(), f)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				walk(mv.Message(), f)
				return true
			})
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
			walk(v.Message(), f)
		}
		return true
	})
}
