package kubernetes_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/internal/k8stest"
)

// The HA overlays (issue 13): overlays/ha ships its etcd, overlays/ha-external-etcd
// takes one from a Secret; both get the server part from the Component
// overlays/ha-server. Their server dry run and least privilege are checked
// with the other kustomizations in manifests_test.go; here is what makes
// them highly available.

const (
	haReplicas  = 3
	serverName  = "meshid-server"
	etcdName    = "meshid-etcd"
	agentName   = "meshid-agent"
	agentPort   = "8443"
	etcdPeer    = "2380"
	etcdClient  = "2379"
	hostnameKey = "kubernetes.io/hostname"
)

// isComponent reports whether the kustomization file is a kustomize
// Component, which only other kustomizations can use.
func isComponent(t *testing.T, file string) bool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var k struct{ Kind string }
	if err := yaml.Unmarshal(b, &k); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return k.Kind == "Component"
}

// haObjects are the rendered objects the HA checks look at.
type haObjects struct {
	statefulSets map[string]*appsv1.StatefulSet
	daemonSets   map[string]*appsv1.DaemonSet
	services     map[string]*corev1.Service
	pdbs         []*policyv1.PodDisruptionBudget
}

func renderHA(t *testing.T, k kubectl, dir string) *haObjects {
	t.Helper()
	out, err := k.run("kustomize", dir)
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, out)
	}
	o := &haObjects{statefulSets: map[string]*appsv1.StatefulSet{}, daemonSets: map[string]*appsv1.DaemonSet{}, services: map[string]*corev1.Service{}}
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(out, -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		var tm metav1.TypeMeta
		if err := json.Unmarshal(js, &tm); err != nil {
			t.Fatal(err)
		}
		switch tm.Kind {
		case "StatefulSet":
			var v appsv1.StatefulSet
			mustDecode(t, dir, js, &v)
			o.statefulSets[v.Name] = &v
		case "DaemonSet":
			var v appsv1.DaemonSet
			mustDecode(t, dir, js, &v)
			o.daemonSets[v.Name] = &v
		case "Service":
			var v corev1.Service
			mustDecode(t, dir, js, &v)
			o.services[v.Name] = &v
		case "PodDisruptionBudget":
			var v policyv1.PodDisruptionBudget
			mustDecode(t, dir, js, &v)
			o.pdbs = append(o.pdbs, &v)
		}
	}
	return o
}

// flagValues returns the values of --name=value arguments.
func flagValues(args []string, name string) []string {
	var vs []string
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

// podNameEnv reports whether c has POD_NAME set from the pod's name, which
// $(POD_NAME) in its arguments expands to.
func podNameEnv(c *corev1.Container) bool {
	return slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "POD_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.name"
	})
}

// problems lists what keeps the rendered overlay from being the HA set-up
// docs/ha.md promises; withEtcd: the overlay ships its own etcd.
func (o *haObjects) problems(withEtcd bool) []string {
	var v []string
	bad := func(format string, args ...any) { v = append(v, fmt.Sprintf(format, args...)) }

	// spread checks a StatefulSet has n replicas, a required one-per-node
	// anti-affinity on its own pods, a readiness probe, and a
	// PodDisruptionBudget of minAvailable n-1 that selects its pods.
	spread := func(s *appsv1.StatefulSet, n int) {
		tl := labels.Set(s.Spec.Template.Labels)
		if s.Spec.Replicas == nil || int(*s.Spec.Replicas) != n {
			got := "default"
			if s.Spec.Replicas != nil {
				got = fmt.Sprint(*s.Spec.Replicas)
			}
			bad("%s: %s replicas, want %d", s.Name, got, n)
		}
		if s.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
			bad("%s: podManagementPolicy %q, want Parallel", s.Name, s.Spec.PodManagementPolicy)
		}
		anti := false
		if a := s.Spec.Template.Spec.Affinity; a != nil && a.PodAntiAffinity != nil {
			for _, term := range a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution {
				sel, err := metav1.LabelSelectorAsSelector(term.LabelSelector)
				if err == nil && term.TopologyKey == hostnameKey && !sel.Empty() && sel.Matches(tl) {
					anti = true
				}
			}
		}
		if !anti {
			bad("%s: no required pod anti-affinity on %s selecting its own pods", s.Name, hostnameKey)
		}
		for _, c := range s.Spec.Template.Spec.Containers {
			if c.ReadinessProbe == nil {
				bad("%s/%s: no readiness probe", s.Name, c.Name)
			}
		}
		var budget *policyv1.PodDisruptionBudget
		for _, p := range o.pdbs {
			sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
			if err == nil && !sel.Empty() && sel.Matches(tl) {
				if budget != nil {
					bad("%s: PodDisruptionBudgets %s and %s both select its pods", s.Name, budget.Name, p.Name)
				}
				budget = p
			}
		}
		switch {
		case budget == nil:
			bad("%s: no PodDisruptionBudget selects its pods", s.Name)
		case budget.Spec.MinAvailable == nil || budget.Spec.MinAvailable.String() != fmt.Sprint(n-1):
			bad("%s: PodDisruptionBudget %s minAvailable %v, want %d", s.Name, budget.Name, budget.Spec.MinAvailable, n-1)
		}
	}
	// headless returns the StatefulSet's governing Service if it is
	// headless and selects its pods.
	headless := func(s *appsv1.StatefulSet) *corev1.Service {
		svc := o.services[s.Spec.ServiceName]
		switch {
		case svc == nil:
			bad("%s: serviceName %q is no Service of the overlay", s.Name, s.Spec.ServiceName)
			return nil
		case svc.Spec.ClusterIP != corev1.ClusterIPNone:
			bad("%s: Service %s is not headless (clusterIP %q): no per-pod DNS names", s.Name, svc.Name, svc.Spec.ClusterIP)
		case len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(s.Spec.Template.Labels)):
			bad("%s: Service %s does not select its pods", s.Name, svc.Name)
		}
		return svc
	}
	// podDNS is replica i's DNS name under its governing Service.
	podDNS := func(s *appsv1.StatefulSet, i int) string {
		return fmt.Sprintf("%s-%d.%s.%s.svc", s.Name, i, s.Spec.ServiceName, s.Namespace)
	}

	server := o.statefulSets[serverName]
	if server == nil {
		return []string{"no StatefulSet " + serverName}
	}
	// Everything in the base's namespace: the per-pod DNS names below
	// and the selectors assume one.
	inNS := func(kind string, m metav1.ObjectMeta) {
		if m.Namespace != server.Namespace {
			bad("%s %s in namespace %q, not %q with the server", kind, m.Name, m.Namespace, server.Namespace)
		}
	}
	for _, s := range o.statefulSets {
		inNS("StatefulSet", s.ObjectMeta)
	}
	for _, s := range o.services {
		inNS("Service", s.ObjectMeta)
	}
	for _, p := range o.pdbs {
		inNS("PodDisruptionBudget", p.ObjectMeta)
	}
	spread(server, haReplicas)
	headless(server)
	if n := len(server.Spec.VolumeClaimTemplates); n != 0 {
		bad("%s: %d volumeClaimTemplates; on etcd the bolt volume is not needed", serverName, n)
	}
	pod := &server.Spec.Template.Spec
	for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
		for _, m := range c.VolumeMounts {
			if !slices.ContainsFunc(pod.Volumes, func(vol corev1.Volume) bool { return vol.Name == m.Name }) {
				bad("%s/%s mounts %s, which is no volume of the pod", serverName, c.Name, m.Name)
			}
		}
	}
	var sc *corev1.Container
	for i := range pod.Containers {
		if pod.Containers[i].Name == "server" {
			sc = &pod.Containers[i]
		}
	}
	if sc == nil {
		return append(v, serverName+": no container server")
	}
	if got := flagValues(sc.Args, "store"); !slices.Equal(got, []string{"etcd"}) {
		bad("%s: --store %v, want etcd", serverName, got)
	}
	if got := flagValues(sc.Args, "replica-id"); !slices.Equal(got, []string{"$(POD_NAME)"}) || !podNameEnv(sc) {
		bad("%s: --replica-id %v, want $(POD_NAME) with POD_NAME from metadata.name", serverName, got)
	}
	for _, f := range []string{"etcd-ca", "etcd-cert", "etcd-key"} {
		if len(flagValues(sc.Args, f)) != 1 {
			bad("%s: no --%s: etcd needs a client certificate", serverName, f)
		}
	}

	// Agents list every replica by its own name: the agent fails over
	// itself, without waiting for a Service's endpoints to drop a dead one.
	var want []string
	for i := range haReplicas {
		want = append(want, podDNS(server, i)+":"+agentPort)
	}
	if a := o.daemonSets[agentName]; a == nil {
		bad("no DaemonSet %s", agentName)
	} else if got := flagValues(a.Spec.Template.Spec.Containers[0].Args, "server"); len(got) != 1 || !slices.Equal(strings.Split(got[0], ","), want) {
		bad("%s: --server %v, want %s", agentName, got, strings.Join(want, ","))
	}

	endpoints := flagValues(sc.Args, "etcd-endpoints")
	etcd := o.statefulSets[etcdName]
	if !withEtcd {
		if etcd != nil {
			bad("an etcd StatefulSet in the external-etcd overlay")
		}
		fromSecret := slices.ContainsFunc(sc.Env, func(e corev1.EnvVar) bool {
			return e.Name == "ETCD_ENDPOINTS" && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Key == "endpoints"
		})
		if !slices.Equal(endpoints, []string{"$(ETCD_ENDPOINTS)"}) || !fromSecret {
			bad("%s: --etcd-endpoints %v, want $(ETCD_ENDPOINTS) from the Secret's key endpoints", serverName, endpoints)
		}
		return v
	}

	if etcd == nil {
		return append(v, "no StatefulSet "+etcdName)
	}
	spread(etcd, haReplicas)
	if svc := headless(etcd); svc != nil && !svc.Spec.PublishNotReadyAddresses {
		bad("%s: Service %s lacks publishNotReadyAddresses: members resolve each other before they are ready", etcdName, svc.Name)
	}
	ec := etcd.Spec.Template.Spec.Containers[0]
	args := slices.Concat(ec.Command, ec.Args)
	one := func(name string) string {
		vs := flagValues(args, name)
		if len(vs) != 1 {
			bad("%s: --%s given %d times, want once", etcdName, name, len(vs))
			return ""
		}
		return vs[0]
	}
	if one("name") != "$(POD_NAME)" || !podNameEnv(&ec) {
		bad("%s: --name is not $(POD_NAME) from metadata.name", etcdName)
	}
	// The member list names exactly the StatefulSet's pods, each at the
	// peer URL it advertises itself.
	var members, clients []string
	n := 1 // the API server's default
	if etcd.Spec.Replicas != nil {
		n = int(*etcd.Spec.Replicas)
	}
	for i := range n {
		members = append(members, fmt.Sprintf("%s-%d=https://%s:%s", etcdName, i, podDNS(etcd, i), etcdPeer))
		clients = append(clients, fmt.Sprintf("https://%s:%s", podDNS(etcd, i), etcdClient))
	}
	if got := one("initial-cluster"); !slices.Equal(strings.Split(got, ","), members) {
		bad("%s: --initial-cluster %q, want %s", etcdName, got, strings.Join(members, ","))
	}
	self := fmt.Sprintf("$(POD_NAME).%s.%s.svc", etcd.Spec.ServiceName, etcd.Namespace)
	if got, w := one("initial-advertise-peer-urls"), "https://"+self+":"+etcdPeer; got != w {
		bad("%s: --initial-advertise-peer-urls %q, want %q", etcdName, got, w)
	}
	if got, w := one("advertise-client-urls"), "https://"+self+":"+etcdClient; got != w {
		bad("%s: --advertise-client-urls %q, want %q", etcdName, got, w)
	}
	for _, f := range []string{"client-cert-auth", "peer-client-cert-auth"} {
		if one(f) != "true" {
			bad("%s: --%s is not true: anyone reaching the port could write entries", etcdName, f)
		}
	}
	if len(endpoints) != 1 || !slices.Equal(strings.Split(endpoints[0], ","), clients) {
		bad("%s: --etcd-endpoints %v, want every member: %s", serverName, endpoints, strings.Join(clients, ","))
	}
	return v
}

// The HA overlays are what they claim: 3 spread replicas behind a PDB on
// etcd, agents listing each, and (ha) an etcd whose member list matches its
// StatefulSet.
func TestHAOverlays(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	for _, c := range []struct {
		dir      string
		withEtcd bool
	}{{"overlays/ha", true}, {"overlays/ha-external-etcd", false}} {
		t.Run(c.dir, func(t *testing.T) {
			if p := renderHA(t, k, c.dir).problems(c.withEtcd); len(p) > 0 {
				t.Fatalf("%s:\n  %s", c.dir, strings.Join(p, "\n  "))
			}
		})
	}
}

// Each way of losing availability makes the HA check fail.
func TestHAOverlaysCatches(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	server := func(o *haObjects) *appsv1.StatefulSet { return o.statefulSets[serverName] }
	etcd := func(o *haObjects) *appsv1.StatefulSet { return o.statefulSets[etcdName] }
	for _, c := range []struct {
		name   string
		mutate func(o *haObjects)
		want   string
	}{
		{"one server replica", func(o *haObjects) { server(o).Spec.Replicas = ptr[int32](1) }, "meshid-server: 1 replicas, want 3"},
		{"bolt volume kept", func(o *haObjects) {
			server(o).Spec.VolumeClaimTemplates = []corev1.PersistentVolumeClaim{{ObjectMeta: metav1.ObjectMeta{Name: "data"}}}
		}, "volumeClaimTemplates"},
		{"no anti-affinity", func(o *haObjects) { server(o).Spec.Template.Spec.Affinity = nil }, "meshid-server: no required pod anti-affinity"},
		{"anti-affinity per zone only", func(o *haObjects) {
			server(o).Spec.Template.Spec.Affinity.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0].TopologyKey = "topology.kubernetes.io/zone"
		}, "meshid-server: no required pod anti-affinity"},
		{"PDB selects other pods", func(o *haObjects) {
			for _, p := range o.pdbs {
				if p.Name == serverName {
					p.Spec.Selector.MatchLabels = map[string]string{"app.kubernetes.io/name": "other"}
				}
			}
		}, "meshid-server: no PodDisruptionBudget selects its pods"},
		{"bolt store", func(o *haObjects) {
			a := server(o).Spec.Template.Spec.Containers[0].Args
			a[slices.Index(a, "--store=etcd")] = "--store=bolt"
		}, "--store [bolt], want etcd"},
		{"governed by the ClusterIP Service", func(o *haObjects) { server(o).Spec.ServiceName = "meshid" }, "is not headless"},
		{"agents on one replica", func(o *haObjects) {
			o.daemonSets[agentName].Spec.Template.Spec.Containers[0].Args[1] = "--server=meshid.meshid.svc:8443"
		}, "meshid-agent: --server [meshid.meshid.svc:8443]"},
		{"etcd scaled without its member list", func(o *haObjects) { etcd(o).Spec.Replicas = ptr[int32](5) }, "meshid-etcd: --initial-cluster"},
		{"etcd member list short", func(o *haObjects) {
			cmd := etcd(o).Spec.Template.Spec.Containers[0].Command
			for i, a := range cmd {
				if strings.HasPrefix(a, "--initial-cluster=") {
					cmd[i] = a[:strings.LastIndex(a, ",")]
				}
			}
		}, "meshid-etcd: --initial-cluster"},
		{"etcd in another namespace", func(o *haObjects) { etcd(o).Namespace = "default" }, `StatefulSet meshid-etcd in namespace "default"`},
		{"etcd ordered start", func(o *haObjects) { etcd(o).Spec.PodManagementPolicy = appsv1.OrderedReadyPodManagement }, "meshid-etcd: podManagementPolicy"},
		{"etcd peers unresolvable", func(o *haObjects) { o.services[etcdName].Spec.PublishNotReadyAddresses = false }, "publishNotReadyAddresses"},
		{"etcd without client certificates", func(o *haObjects) {
			cmd := etcd(o).Spec.Template.Spec.Containers[0].Command
			cmd[slices.Index(cmd, "--client-cert-auth=true")] = "--client-cert-auth=false"
		}, "--client-cert-auth is not true"},
		{"servers on one member", func(o *haObjects) {
			a := server(o).Spec.Template.Spec.Containers[0].Args
			for i, s := range a {
				if strings.HasPrefix(s, "--etcd-endpoints=") {
					a[i] = s[:strings.Index(s, ",")]
				}
			}
		}, "meshid-server: --etcd-endpoints"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := renderHA(t, k, "overlays/ha")
			if p := o.problems(true); len(p) > 0 {
				t.Fatalf("overlays/ha fails before the change: %v", p)
			}
			c.mutate(o)
			p := o.problems(true)
			if !slices.ContainsFunc(p, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Fatalf("after %s, no problem contains %q: %v", c.name, c.want, p)
			}
		})
	}
}

// The server dry run refuses a broken HA overlay, so the pass of
// TestManifestsApplyDryRunServer on overlays/ha means something: a copy of
// base, ha-server and ha passes, and an overlay of that copy with one
// mistake fails naming it.
func TestHAOverlayDryRunRefusesBroken(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	_, err := bed.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "meshid"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace meshid: %v", err)
	}
	tmp := t.TempDir()
	for _, d := range []string{"base", "overlays/ha-server", "overlays/ha"} {
		copyDir(t, d, filepath.Join(tmp, d))
	}
	if out, err := k.run("apply", "--dry-run=server", "-k", filepath.Join(tmp, "overlays/ha")); err != nil {
		t.Fatalf("the copy of overlays/ha fails already: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name, kind, target, patch, want string
	}{
		{"etcd start order", "StatefulSet", etcdName, `- op: replace
  path: /spec/podManagementPolicy
  value: Sometimes`, `podManagementPolicy: Invalid value: "Sometimes"`},
		{"server PDB both bounds", "PodDisruptionBudget", serverName, `- op: add
  path: /spec/maxUnavailable
  value: 1`, "minAvailable and maxUnavailable cannot be both set"},
		{"anti-affinity without topology", "StatefulSet", serverName, `- op: replace
  path: /spec/template/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/0/topologyKey
  value: ""`, "topologyKey: Required value"},
		{"mount of no volume", "StatefulSet", serverName, `- op: add
  path: /spec/template/spec/initContainers/0/volumeMounts/-
  value: {name: etcd-certs, mountPath: /etc/meshid/certs}`, `name: Not found: "etcd-certs"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(tmp, "overlays", strings.ReplaceAll(c.name, " ", "-"))
			kust := "resources:\n  - ../ha\npatches:\n  - target:\n      kind: " + c.kind + "\n      name: " + c.target + "\n    patch: |\n" + indent(c.patch, "      ") + "\n"
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := k.run("apply", "--dry-run=server", "-k", dir)
			if err == nil {
				t.Fatalf("overlays/ha with %s passed the server dry run:\n%s", c.name, out)
			}
			if !strings.Contains(out, c.want) {
				t.Fatalf("overlays/ha with %s failed, but without %q:\n%s", c.name, c.want, out)
			}
		})
	}
}

// The HA overlays' server and agent arguments parse as meshid flags (as
// TestManifestFlagsExist checks for the base).
func TestHAOverlayFlagsExist(t *testing.T) {
	bed := k8stest.Shared(t)
	k := newKubectl(t, bed)
	for _, dir := range []string{"overlays/ha", "overlays/ha-external-etcd"} {
		o := renderHA(t, k, dir)
		t.Run(dir+"/server", func(t *testing.T) {
			checkFlagsParse(t, dir, "server", containerNamed(t, &o.statefulSets[serverName].Spec.Template.Spec, "server").Args)
		})
		t.Run(dir+"/agent", func(t *testing.T) {
			checkFlagsParse(t, dir, "agent", containerNamed(t, &o.daemonSets[agentName].Spec.Template.Spec, "agent").Args)
		})
	}
}
