package cli

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// meshid status: a table and a JSON document; with no agent connected the
// convergence is 1 and nothing holds activation back.
func TestStatusCommand(t *testing.T) {
	_, sock := cliServer(t)
	admin := "--admin-socket=" + sock
	out, errOut, code := run(t, "status", admin)
	if code != 0 {
		t.Fatalf("status: %s", errOut)
	}
	if !strings.Contains(out, "TOTAL (0 agents)") || !strings.Contains(out, "convergence 100.0%") ||
		!strings.Contains(out, "store bolt at revision") || !regexp.MustCompile(`(?m)^\S+\s+leader\s`).MatchString(out) {
		t.Fatalf("status table:\n%s", out)
	}
	out, errOut, code = run(t, "status", admin, "-o", "json")
	if code != 0 {
		t.Fatalf("status -o json: %s", errOut)
	}
	var doc struct {
		BundleVersion    string  `json:"bundle_version"`
		ConvergenceRatio float64 `json:"convergence_ratio"`
		Agents           []any   `json:"agents"`
		Store            struct {
			Backend  string `json:"backend"`
			Revision string `json:"revision"` // protojson: int64 as a string
			Leader   string `json:"leader"`
			Replica  string `json:"replica"`
		} `json:"store"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.BundleVersion == "" || doc.ConvergenceRatio != 1 || len(doc.Agents) != 0 ||
		doc.Store.Backend != "bolt" || doc.Store.Revision == "" || doc.Store.Leader == "" || doc.Store.Leader != doc.Store.Replica {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	_, errOut, code = run(t, "status", admin, "-o", "xml")
	if code != 1 || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("status -o xml: exit %d, %q", code, errOut)
	}
}

func TestMinConvergenceFlagRange(t *testing.T) {
	for _, v := range []string{"1.5", "-0.1", "NaN"} {
		_, errOut, code := run(t, "server", "--data-dir", filepath.Join(t.TempDir(), "d"), "--ca-activate-min-convergence", v)
		if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "--ca-activate-min-convergence") {
			t.Fatalf("--ca-activate-min-convergence %s: exit %d, %q", v, code, errOut)
		}
	}
}

func TestAgentKeepaliveFlagRange(t *testing.T) {
	for _, v := range []string{"0s", "500ms", "-1s"} {
		_, errOut, code := run(t, "server", "--data-dir", filepath.Join(t.TempDir(), "d"), "--agent-keepalive", v)
		if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "--agent-keepalive "+v+": must be at least 1s") {
			t.Fatalf("--agent-keepalive %s: exit %d, %q", v, code, errOut)
		}
	}
}
