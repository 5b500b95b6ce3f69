// Package prometheus_test checks the Prometheus alerting rules in this
// directory with promtool: the rule file must load and its unit tests
// (meshid-alerts.test.yaml) must pass. The package holds no code; it exists
// so that "go test ./..." runs the check.
package prometheus_test

import (
	"os"
	"os/exec"
	"testing"
)

// promtool returns the path of promtool, failing in CI (where .ci/run
// installs it) and skipping elsewhere when it is missing.
func promtool(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err == nil {
		return path
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("promtool not on PATH in CI (.ci/run installs Debian's prometheus package): %v", err)
	}
	t.Skip("promtool not on PATH; `apt-get install prometheus` (Debian/Ubuntu) provides it and enables this test")
	return ""
}

// run runs promtool with args in the test's directory (this package's
// directory) and fails with promtool's output if it fails.
func run(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command(promtool(t), args...)
	cmd.Dir = "." // go test runs a package's tests in its directory
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %v: %v\n%s", args, err, out)
	}
	t.Logf("promtool %v:\n%s", args, out)
}

func TestAlertRulesValid(t *testing.T) {
	run(t, "check", "rules", "meshid-alerts.yaml")
}

func TestAlertRulesUnitTests(t *testing.T) {
	run(t, "test", "rules", "meshid-alerts.test.yaml")
}
