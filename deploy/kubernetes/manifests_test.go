// Package kubernetes_test checks the kustomizations in this directory: they
// render, pass `kubectl apply --dry-run=server` against a real API server
// (the test bed, internal/k8stest), and keep to least privilege (non-root,
// read-only root filesystem, seccomp RuntimeDefault, no capability or RBAC
// verb beyond the listed ones). The package holds no code.
package kubernetes_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/internal/k8stest"
)

// kustomizations lists every directory under deploy/kubernetes with a
// kustomization.yaml (testdata excepted), so a new overlay or example is
// checked without being added to a list.
func kustomizations(t *testing.T) []string {
	t.Helper()
	var dirs []string
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return filepath.SkipDir
		}
		if d.Name() == "kustomization.yaml" {
			// A Component (overlays/ha-server) cannot be applied alone;
			// the overlays that use it are checked instead.
			if isComponent(t, p) {
				return nil
			}
			dirs = append(dirs, filepath.Dir(p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".", "base", "overlays/prometheus", "overlays/grafana", "examples", "examples/envoy-sidecar", "examples/go-spiffe", "overlays/ha", "overlays/ha-external-etcd"} {
		if !slices.Contains(dirs, want) {
			t.Fatalf("kustomization %s missing (found %v)", want, dirs)
		}
	}
	return dirs
}

// kubectl runs the bed's kubectl with its admin kubeconfig and a discovery
// cache of this test's own (a cache shared across runs could predate the
// CRDs installed below).
type kubectl struct {
	bin, kubeconfig, cache string
}

func newKubectl(t *testing.T, bed *k8stest.Bed) kubectl {
	return kubectl{bin: bed.Kubectl, kubeconfig: bed.Kubeconfig, cache: t.TempDir()}
}

func (k kubectl) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, k.bin, append([]string{"--kubeconfig", k.kubeconfig, "--cache-dir", k.cache}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// The shipped kustomizations are accepted by a real API server: every
// object passes its schema (strict field validation: an unknown field is
// an error), defaulting and admission. A dry run cannot create the
// namespaces its own objects live in, so they are created for real first;
// the Prometheus Operator kinds get stand-in CRDs (testdata).
func TestManifestsApplyDryRunServer(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	ctx := context.Background()
	for _, ns := range []string{"meshid", "meshid-demo"} {
		_, err := bed.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("create namespace %s: %v", ns, err)
		}
	}
	if out, err := k.run("apply", "-f", "testdata/monitoring-crds.yaml"); err != nil {
		t.Fatalf("install test CRDs: %v\n%s", err, out)
	}
	if out, err := k.run("wait", "--for=condition=Established", "--timeout=60s",
		"crd/prometheusrules.monitoring.coreos.com", "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com"); err != nil {
		t.Fatalf("test CRDs not established: %v\n%s", err, out)
	}

	for _, dir := range kustomizations(t) {
		t.Run(dir, func(t *testing.T) {
			out, err := k.run("apply", "--dry-run=server", "-k", dir)
			if err != nil {
				t.Fatalf("kubectl apply --dry-run=server -k %s: %v\n%s", dir, err, out)
			}
			if !strings.Contains(out, "(server dry run)") {
				t.Fatalf("kubectl apply --dry-run=server -k %s said no server dry run:\n%s", dir, out)
			}
		})
	}

	// The same check refuses a broken manifest, so a pass above means
	// something: a copy of the base, which passes, and that copy with one
	// patch each, which must fail naming what is wrong.
	tmp := t.TempDir()
	copyDir(t, "base", filepath.Join(tmp, "base"))
	if out, err := k.run("apply", "--dry-run=server", "-k", filepath.Join(tmp, "base")); err != nil {
		t.Fatalf("the copy of the base fails already: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name, patch, want string
	}{
		{"unknown field", `- op: add
  path: /spec/template/spec/containers/0/portz
  value: 8443`, `unknown field "spec.template.spec.containers[0].portz"`},
		{"bad seccomp type", `- op: replace
  path: /spec/template/spec/securityContext/seccompProfile/type
  value: Sometimes`, `seccompProfile.type: Unsupported value: "Sometimes"`},
	} {
		t.Run("broken/"+c.name, func(t *testing.T) {
			dir := filepath.Join(tmp, strings.ReplaceAll(c.name, " ", "-"))
			kust := "resources:\n  - ../base\npatches:\n  - target:\n      kind: StatefulSet\n      name: meshid-server\n    patch: |\n" + indent(c.patch, "      ") + "\n"
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := k.run("apply", "--dry-run=server", "-k", dir)
			if err == nil {
				t.Fatalf("a base with %s passed the server dry run:\n%s", c.name, out)
			}
			if !strings.Contains(out, c.want) {
				t.Fatalf("a base with %s failed, but without %q:\n%s", c.name, c.want, out)
			}
		})
	}
}

// What the base and the examples render to keeps to least privilege.
func TestManifestsLeastPrivilege(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	for _, dir := range []string{".", "examples", "overlays/ha", "overlays/ha-external-etcd"} {
		t.Run(dir, func(t *testing.T) {
			r := render(t, k, dir)
			if len(r.workloads) == 0 {
				t.Fatalf("%s renders no workloads", dir)
			}
			if v := r.violations(); len(v) > 0 {
				t.Fatalf("%s:\n  %s", dir, strings.Join(v, "\n  "))
			}
		})
	}
}

// Each kind of widening makes the least-privilege check fail.
func TestManifestsLeastPrivilegeCatches(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	for _, c := range []struct {
		name   string
		mutate func(r *rendered)
		want   string
	}{
		{"secrets for the agent", func(r *rendered) {
			r.clusterRole("meshid-agent").Rules = append(r.clusterRole("meshid-agent").Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get"}})
		}, "ClusterRole meshid-agent grants get on secrets"},
		{"wildcard verb for the server", func(r *rendered) {
			r.clusterRole("meshid-server").Rules[1].Verbs = []string{"*"}
		}, "ClusterRole meshid-server grants * on pods"},
		{"a new ClusterRole", func(r *rendered) {
			r.clusterRoles = append(r.clusterRoles, rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "meshid-extra"}})
		}, "unexpected ClusterRole meshid-extra"},
		{"binding to cluster-admin", func(r *rendered) {
			r.clusterBindings[0].RoleRef.Name = "cluster-admin"
		}, "binds ClusterRole cluster-admin"},
		{"bundle Role without resourceNames", func(r *rendered) {
			r.roles[0].Rules[0].ResourceNames = nil
		}, "get on configmaps without resourceNames [meshid-bundle]"},
		{"writable root filesystem", func(r *rendered) {
			r.container("StatefulSet/meshid-server/server").SecurityContext.ReadOnlyRootFilesystem = ptr(false)
		}, "StatefulSet/meshid-server/server: readOnlyRootFilesystem"},
		{"server as root", func(r *rendered) {
			r.container("StatefulSet/meshid-server/server").SecurityContext.RunAsUser = ptr[int64](0)
		}, "StatefulSet/meshid-server/server: runs as root"},
		{"SYS_ADMIN for the agent", func(r *rendered) {
			sc := r.container("DaemonSet/meshid-agent/agent").SecurityContext
			sc.Capabilities.Add = append(sc.Capabilities.Add, "SYS_ADMIN")
		}, "DaemonSet/meshid-agent/agent: capability SYS_ADMIN"},
		{"unconfined seccomp", func(r *rendered) {
			r.workloads[0].pod.SecurityContext.SeccompProfile.Type = corev1.SeccompProfileTypeUnconfined
		}, "seccomp Unconfined, want RuntimeDefault"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := render(t, k, ".")
			if v := r.violations(); len(v) > 0 {
				t.Fatalf("the base fails before the change: %v", v)
			}
			c.mutate(r)
			v := r.violations()
			if !slices.ContainsFunc(v, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Fatalf("after %s, no violation contains %q: %v", c.name, c.want, v)
			}
		})
	}
}

// rendered holds the objects the checks look at, typed.
type rendered struct {
	workloads       []workload
	clusterRoles    []rbacv1.ClusterRole
	clusterBindings []rbacv1.ClusterRoleBinding
	roles           []rbacv1.Role
	bindings        []rbacv1.RoleBinding
}

type workload struct {
	key string // Kind/name
	pod *corev1.PodSpec
}

func render(t *testing.T, k kubectl, dir string) *rendered {
	t.Helper()
	out, err := k.run("kustomize", dir)
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, out)
	}
	r := &rendered{}
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(out, -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v\n%s", dir, err, doc)
		}
		var tm metav1.TypeMeta
		if err := json.Unmarshal(js, &tm); err != nil {
			t.Fatal(err)
		}
		into := func(v any) {
			t.Helper()
			dec := json.NewDecoder(bytes.NewReader(js))
			dec.DisallowUnknownFields()
			if err := dec.Decode(v); err != nil {
				t.Fatalf("%s: %s: %v", dir, tm.Kind, err)
			}
		}
		switch tm.Kind {
		case "Deployment":
			var o appsv1.Deployment
			into(&o)
			r.workloads = append(r.workloads, workload{"Deployment/" + o.Name, &o.Spec.Template.Spec})
		case "StatefulSet":
			var o appsv1.StatefulSet
			into(&o)
			r.workloads = append(r.workloads, workload{"StatefulSet/" + o.Name, &o.Spec.Template.Spec})
		case "DaemonSet":
			var o appsv1.DaemonSet
			into(&o)
			r.workloads = append(r.workloads, workload{"DaemonSet/" + o.Name, &o.Spec.Template.Spec})
		case "Pod", "Job", "CronJob", "ReplicaSet", "ReplicationController":
			t.Fatalf("%s: %s is not covered by the checks; add it", dir, tm.Kind)
		case "ClusterRole":
			var o rbacv1.ClusterRole
			into(&o)
			r.clusterRoles = append(r.clusterRoles, o)
		case "ClusterRoleBinding":
			var o rbacv1.ClusterRoleBinding
			into(&o)
			r.clusterBindings = append(r.clusterBindings, o)
		case "Role":
			var o rbacv1.Role
			into(&o)
			r.roles = append(r.roles, o)
		case "RoleBinding":
			var o rbacv1.RoleBinding
			into(&o)
			r.bindings = append(r.bindings, o)
		}
	}
	return r
}

func (r *rendered) clusterRole(name string) *rbacv1.ClusterRole {
	for i := range r.clusterRoles {
		if r.clusterRoles[i].Name == name {
			return &r.clusterRoles[i]
		}
	}
	panic("no ClusterRole " + name)
}

func (r *rendered) container(key string) *corev1.Container {
	for _, w := range r.workloads {
		for i := range w.pod.InitContainers {
			if w.key+"/"+w.pod.InitContainers[i].Name == key {
				return &w.pod.InitContainers[i]
			}
		}
		for i := range w.pod.Containers {
			if w.key+"/"+w.pod.Containers[i].Name == key {
				return &w.pod.Containers[i]
			}
		}
	}
	panic("no container " + key)
}

// The grants, exactly. Widening any of them is a change to this table too,
// where a reviewer sees it.
var (
	// ClusterRole -> "apiGroup/resource/verb".
	allowedClusterRules = map[string][]string{
		"meshid-server": {"authentication.k8s.io/tokenreviews/create",
			"/pods/get", "/pods/list", "/pods/watch", "/nodes/get", "/nodes/list", "/nodes/watch"},
		"meshid-agent": {"/pods/get", "/pods/list", "/pods/watch"},
		// The trust bundle as ClusterTrustBundles and a ConfigMap per
		// namespace (issue 12): reads come from informers, so no get.
		"meshid-server-trust": {
			"certificates.k8s.io/clustertrustbundles/list", "certificates.k8s.io/clustertrustbundles/watch",
			"certificates.k8s.io/clustertrustbundles/create", "certificates.k8s.io/clustertrustbundles/update",
			"certificates.k8s.io/clustertrustbundles/delete", "certificates.k8s.io/signers/attest",
			"/namespaces/list", "/namespaces/watch",
			"/configmaps/list", "/configmaps/watch", "/configmaps/update", "/configmaps/delete", "/configmaps/create"},
		// The pod certificate signer (issue 12).
		"meshid-server-pcr": {
			"certificates.k8s.io/podcertificaterequests/get", "certificates.k8s.io/podcertificaterequests/list",
			"certificates.k8s.io/podcertificaterequests/watch", "certificates.k8s.io/podcertificaterequests/status/update",
			"certificates.k8s.io/signers/sign"},
	}
	// ClusterRole grants that must be limited to resourceNames.
	clusterRuleNames = map[string]map[string]string{
		"meshid-server-pcr": {"certificates.k8s.io/signers/sign": "meshid.io/spiffe"},
		"meshid-server-trust": {
			"certificates.k8s.io/signers/attest": "meshid.io/spiffe",
			"/configmaps/list":                   "meshid-ca-root-cert", "/configmaps/watch": "meshid-ca-root-cert",
			"/configmaps/update": "meshid-ca-root-cert", "/configmaps/delete": "meshid-ca-root-cert",
		},
	}
	// Role -> "apiGroup/resource/verb" -> the resourceNames it must be
	// limited to ("" for create, which RBAC cannot limit by name).
	allowedRoleRules = map[string]map[string]string{
		"meshid-server-bundle": {"/configmaps/get": "meshid-bundle", "/configmaps/update": "meshid-bundle", "/configmaps/create": ""},
	}
	// Containers that run as uid 0, and why: base/agent.yaml and
	// base/server.yaml explain each.
	rootContainers = map[string]bool{
		"DaemonSet/meshid-agent/agent":      true, // root-owned host paths for the socket and data dir
		"StatefulSet/meshid-server/prepare": true, // chowns the KEK copy and the server's directories
	}
	// Capabilities beyond none, per container.
	allowedCaps = map[string][]corev1.Capability{
		"DaemonSet/meshid-agent/agent":      {"SYS_PTRACE", "DAC_READ_SEARCH"},
		"StatefulSet/meshid-server/prepare": {"CHOWN"},
	}
	hostPIDWorkloads = map[string]bool{"DaemonSet/meshid-agent": true}
)

func (r *rendered) violations() []string {
	var v []string
	bad := func(format string, args ...any) { v = append(v, fmt.Sprintf(format, args...)) }

	for _, cr := range r.clusterRoles {
		allowed, ok := allowedClusterRules[cr.Name]
		if !ok {
			bad("unexpected ClusterRole %s", cr.Name)
			continue
		}
		if cr.AggregationRule != nil {
			bad("ClusterRole %s aggregates other roles", cr.Name)
		}
		for _, rule := range cr.Rules {
			if len(rule.NonResourceURLs) > 0 {
				bad("ClusterRole %s grants non-resource URLs %v", cr.Name, rule.NonResourceURLs)
			}
			eachGrant(rule, func(g, res, verb string) {
				if !slices.Contains(allowed, g+"/"+res+"/"+verb) {
					bad("ClusterRole %s grants %s on %s (group %q), beyond %v", cr.Name, verb, res, g, allowed)
				}
				if names, ok := clusterRuleNames[cr.Name][g+"/"+res+"/"+verb]; ok && !slices.Equal(rule.ResourceNames, []string{names}) {
					bad("ClusterRole %s grants %s on %s without resourceNames [%s] (has %v)", cr.Name, verb, res, names, rule.ResourceNames)
				}
			})
		}
	}
	for _, b := range r.clusterBindings {
		if _, ok := allowedClusterRules[b.RoleRef.Name]; !ok || b.RoleRef.Kind != "ClusterRole" {
			bad("ClusterRoleBinding %s binds ClusterRole %s", b.Name, b.RoleRef.Name)
		}
	}
	for _, role := range r.roles {
		allowed, ok := allowedRoleRules[role.Name]
		if !ok {
			bad("unexpected Role %s", role.Name)
			continue
		}
		for _, rule := range role.Rules {
			eachGrant(rule, func(g, res, verb string) {
				names, ok := allowed[g+"/"+res+"/"+verb]
				switch {
				case !ok:
					bad("Role %s grants %s on %s (group %q)", role.Name, verb, res, g)
				case names != "" && !slices.Equal(rule.ResourceNames, []string{names}):
					bad("Role %s grants %s on %s without resourceNames [%s] (has %v)", role.Name, verb, res, names, rule.ResourceNames)
				}
			})
		}
	}
	for _, b := range r.bindings {
		if _, ok := allowedRoleRules[b.RoleRef.Name]; !ok || b.RoleRef.Kind != "Role" {
			bad("RoleBinding %s binds %s %s", b.Name, b.RoleRef.Kind, b.RoleRef.Name)
		}
	}

	for _, w := range r.workloads {
		p := w.pod
		if p.HostNetwork || p.HostIPC {
			bad("%s: host network or IPC namespace", w.key)
		}
		if p.HostPID && !hostPIDWorkloads[w.key] {
			bad("%s: hostPID", w.key)
		}
		psc := p.SecurityContext
		if psc == nil {
			psc = &corev1.PodSecurityContext{}
		}
		for _, c := range slices.Concat(p.InitContainers, p.Containers) {
			key := w.key + "/" + c.Name
			sc := c.SecurityContext
			if sc == nil {
				bad("%s: no securityContext", key)
				continue
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				bad("%s: readOnlyRootFilesystem is not true", key)
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				bad("%s: allowPrivilegeEscalation is not false", key)
			}
			if sc.Privileged != nil && *sc.Privileged {
				bad("%s: privileged", key)
			}
			seccomp := psc.SeccompProfile
			if sc.SeccompProfile != nil {
				seccomp = sc.SeccompProfile
			}
			if seccomp == nil {
				bad("%s: no seccomp profile, want RuntimeDefault", key)
			} else if seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
				bad("%s: seccomp %s, want RuntimeDefault", key, seccomp.Type)
			}
			if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
				bad("%s: capabilities do not drop ALL", key)
			} else {
				for _, c := range sc.Capabilities.Add {
					if !slices.Contains(allowedCaps[key], c) {
						bad("%s: capability %s beyond %v", key, c, allowedCaps[key])
					}
				}
			}
			if rootContainers[key] {
				continue
			}
			uid, nonRoot := psc.RunAsUser, psc.RunAsNonRoot
			if sc.RunAsUser != nil {
				uid = sc.RunAsUser
			}
			if sc.RunAsNonRoot != nil {
				nonRoot = sc.RunAsNonRoot
			}
			switch {
			case uid == nil:
				bad("%s: no runAsUser (the image's user decides)", key)
			case *uid == 0:
				bad("%s: runs as root", key)
			case nonRoot == nil || !*nonRoot:
				bad("%s: runAsNonRoot is not true", key)
			}
		}
	}
	sort.Strings(v)
	return v
}

func eachGrant(rule rbacv1.PolicyRule, f func(group, resource, verb string)) {
	for _, g := range rule.APIGroups {
		for _, res := range rule.Resources {
			for _, verb := range rule.Verbs {
				f(g, res, verb)
			}
		}
	}
}

func ptr[T any](v T) *T { return &v }

func indent(s, prefix string) string {
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}

// copyDir copies the regular files of src (one level: the base is flat).
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			t.Fatalf("%s/%s is not a regular file; copyDir copies only a flat directory", src, e.Name())
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
