package kubernetes_test

import (
	"bytes"
	"flag"
	"os"
	"reflect"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// update regenerates the files this package's tests compare against their
// sources: go test ./deploy/kubernetes -run TestPrometheusRule -args -update
var update = flag.Bool("update", false, "regenerate overlays/prometheus/prometheusrule.yaml from deploy/prometheus/meshid-alerts.yaml")

const (
	alertsFile = "../prometheus/meshid-alerts.yaml"
	ruleFile   = "overlays/prometheus/prometheusrule.yaml"
)

const ruleHeader = `# GENERATED from deploy/prometheus/meshid-alerts.yaml; do not edit. Edit that
# file, then: go test ./deploy/kubernetes -run TestPrometheusRule -args -update
# (TestPrometheusRuleMatchesAlertRules fails while the two differ).
#
# The rules expect the server under job="meshid": monitors.yaml's
# ServiceMonitor gives it that job (the Service's name). A Prometheus whose
# ruleSelector wants a label (kube-prometheus-stack: release=<name>) needs it
# added here with a kustomize patch.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: meshid
  namespace: meshid
  labels:
    app.kubernetes.io/name: meshid
spec:
`

// renderPrometheusRule wraps the rule file's groups, comments included, in
// a PrometheusRule: everything from the top-level "groups:" line on becomes
// spec.groups, indented two spaces (block scalars keep their meaning when
// every line moves by the same amount).
func renderPrometheusRule(src []byte) ([]byte, error) {
	i := bytes.Index(src, []byte("\ngroups:"))
	if i < 0 {
		return nil, errNoGroups
	}
	var b bytes.Buffer
	b.WriteString(ruleHeader)
	for _, line := range strings.SplitAfter(string(src[i+1:]), "\n") {
		if strings.TrimSpace(line) != "" {
			b.WriteString("  ")
		}
		b.WriteString(line)
	}
	return b.Bytes(), nil
}

type ruleError string

func (e ruleError) Error() string { return string(e) }

const errNoGroups = ruleError("no top-level groups: line")

// The PrometheusRule in the overlay is the alert rule file, generated, so
// the two cannot drift: byte for byte against a fresh render, and, so that
// a faulty render cannot pass too, its spec.groups equal the file's groups
// as parsed YAML.
func TestPrometheusRuleMatchesAlertRules(t *testing.T) {
	src, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	want, err := renderPrometheusRule(src)
	if err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	if *update {
		if err := os.WriteFile(ruleFile, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(ruleFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is stale against %s: run go test ./deploy/kubernetes -run TestPrometheusRule -args -update", ruleFile, alertsFile)
	}

	var file struct {
		Groups []any `yaml:"groups"`
	}
	if err := yaml.Unmarshal(src, &file); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	var rule struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Spec       struct {
			Groups []any `yaml:"groups"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(got, &rule); err != nil {
		t.Fatalf("%s: %v", ruleFile, err)
	}
	if rule.APIVersion != "monitoring.coreos.com/v1" || rule.Kind != "PrometheusRule" {
		t.Fatalf("%s is %s %s, want monitoring.coreos.com/v1 PrometheusRule", ruleFile, rule.APIVersion, rule.Kind)
	}
	if len(file.Groups) == 0 {
		t.Fatalf("%s has no groups", alertsFile)
	}
	if !reflect.DeepEqual(rule.Spec.Groups, file.Groups) {
		t.Fatalf("spec.groups of %s differ from the groups of %s", ruleFile, alertsFile)
	}
}

// The check above catches a hand edit of the generated file.
func TestPrometheusRuleDriftIsCaught(t *testing.T) {
	src, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	good, err := renderPrometheusRule(src)
	if err != nil {
		t.Fatal(err)
	}
	edited := bytes.Replace(src, []byte("for: 1h"), []byte("for: 2h"), 1)
	if bytes.Equal(edited, src) {
		t.Fatal("alert file has no 'for: 1h' to edit; pick another edit")
	}
	drifted, err := renderPrometheusRule(edited)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(good, drifted) {
		t.Fatal("an edit of the alert file does not change the rendered PrometheusRule")
	}
}
