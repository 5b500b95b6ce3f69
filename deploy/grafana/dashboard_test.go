// Package grafana_test checks the Grafana dashboard meshid.json against a
// live meshid server and node agent: every meshid_* metric a panel or
// variable queries must be exported by one of them, so a renamed or
// removed metric cannot leave a panel silently empty. The package holds no
// code; the test binary doubles as the meshid binary (MESHID_DASHBOARD_EXEC=1
// runs the CLI), so the processes are the real CLI without a build step.
package grafana_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/cli"
)

const execEnv = "MESHID_DASHBOARD_EXEC"

func TestMain(m *testing.M) {
	if os.Getenv(execEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// start runs `meshid args...` and returns once a stderr line contains
// ready, with that line. The process is stopped (SIGTERM, then waited for)
// when the test ends.
func start(t *testing.T, ready string, args ...string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), execEnv+"=1")
	cmd.Stdout = io.Discard
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 64)
	var logged bytes.Buffer
	done := make(chan struct{})
	go func() { // ends when the process closes stderr (exits)
		defer close(done)
		sc := bufio.NewScanner(errPipe)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default: // the test stopped reading; keep draining
			}
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		_ = cmd.Wait()
	})
	deadline := time.After(60 * time.Second)
	for {
		select {
		case l := <-lines:
			logged.WriteString(l + "\n")
			if strings.Contains(l, ready) {
				return l
			}
		case <-done:
			t.Fatalf("meshid %s exited before logging %q:\n%s", args[0], ready, logged.String())
		case <-deadline:
			t.Fatalf("meshid %s did not log %q within 60s:\n%s", args[0], ready, logged.String())
		}
	}
}

func field(t *testing.T, line, key string) string {
	t.Helper()
	m := regexp.MustCompile(`\b` + key + `=(\S+)`).FindStringSubmatch(line)
	if m == nil || m[1] == `""` {
		t.Fatalf("no %s= in %q", key, line)
	}
	return m[1]
}

func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if code := cli.Main(ctx, args, &out, &errb); code != 0 {
		t.Fatalf("meshid %v: exit %d: %s", args, code, errb.String())
	}
	return out.String()
}

// scrape returns the sample names (histograms as their _bucket, _sum and
// _count series, as PromQL sees them) that addr's /metrics exports.
func scrape(t *testing.T, addr string) map[string]bool {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s/metrics: %s", addr, resp.Status)
	}
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.IndexAny(l, "{ "); i > 0 {
			names[l[:i]] = true
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return names
}

// waitMetric polls addr until its sample line is exactly want.
func waitMetric(t *testing.T, addr, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if slices.Contains(strings.Split(string(b), "\n"), want) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never exported %q", addr, want)
		}
		time.Sleep(100 * time.Millisecond) // polling a condition, with a deadline
	}
}

var metricName = regexp.MustCompile(`\bmeshid_[A-Za-z0-9_:]*`)

// queries returns every PromQL text of the dashboard: panel targets
// (rows' nested panels too) and query variables.
func queries(dash map[string]any) []string {
	var out []string
	var walk func(v any, key string)
	walk = func(v any, key string) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				walk(x, k)
			}
		case []any:
			for _, x := range v {
				walk(x, key)
			}
		case string:
			if key == "expr" || key == "query" || key == "definition" {
				out = append(out, v)
			}
		}
	}
	walk(dash["panels"], "")
	walk(dash["templating"], "")
	return out
}

// missing returns, sorted, the meshid_* names the queries use that are not
// in exported, and all names used.
func missing(qs []string, exported map[string]bool) (miss, used []string) {
	seen := map[string]bool{}
	for _, q := range qs {
		for _, n := range metricName.FindAllString(q, -1) {
			if seen[n] {
				continue
			}
			seen[n] = true
			used = append(used, n)
			if !exported[n] {
				miss = append(miss, n)
			}
		}
	}
	sort.Strings(miss)
	sort.Strings(used)
	return miss, used
}

func loadDashboard(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile("meshid.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("meshid.json: %v", err)
	}
	return dash
}

// Every metric the dashboard queries exists on a live server or agent, and
// the dashboard covers each thing an operator looks at (issue 11, part 5).
func TestDashboardMetricsExist(t *testing.T) {
	dash := loadDashboard(t)
	qs := queries(dash)

	dir, err := os.MkdirTemp("", "meshid-dash-") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	admin := "--admin-socket=" + filepath.Join(dir, "admin", "admin.sock")
	serving := start(t, "msg=serving", "server", admin,
		"--data-dir", filepath.Join(dir, "server"), "--socket", filepath.Join(dir, "srv", "workload.sock"),
		"--agent-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
	agentAPI, serverMetrics := field(t, serving, "agent_api"), field(t, serving, "metrics")

	bundle := filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(bundle, []byte(runCLI(t, "bundle", "show", admin)), 0o644); err != nil {
		t.Fatal(err)
	}
	var tok struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(runCLI(t, "token", "create", admin, "--agent", "--node-id", "dash", "--ttl", "10m", "-o", "json")), &tok); err != nil || tok.Token == "" {
		t.Fatalf("token create -o json: %v", err)
	}
	agentServing := start(t, "agent serving", "agent", "--server", agentAPI, "--join-token", tok.Token, "--trust-bundle", bundle,
		"--data-dir", filepath.Join(dir, "agent"), "--socket", filepath.Join(dir, "ag", "workload.sock"), "--metrics-listen", "127.0.0.1:0")
	agentMetrics := field(t, agentServing, "metrics")
	waitMetric(t, agentMetrics, "meshid_agent_connected 1")

	exported := scrape(t, serverMetrics)
	for n := range scrape(t, agentMetrics) {
		exported[n] = true
	}
	miss, used := missing(qs, exported)
	if len(miss) > 0 {
		t.Fatalf("meshid.json queries metrics neither the server nor the agent exports: %v", miss)
	}
	t.Logf("all %d meshid_* metrics the dashboard queries are exported: %v", len(used), used)

	for topic, name := range map[string]string{
		"issuance rate":            "meshid_svid_issued_total",
		"issuance errors":          "meshid_svid_issue_errors_total",
		"signing wait":             "meshid_sign_wait_seconds_bucket",
		"CA expiry":                "meshid_ca_expiry_timestamp_seconds",
		"SVID expiry":              "meshid_svid_earliest_expiry_timestamp_seconds",
		"SDS streams":              "meshid_sds_streams",
		"SDS pushes":               "meshid_sds_pushes_total",
		"SDS NACKs":                "meshid_sds_nacks_total",
		"Workload API watchers":    "meshid_workload_streams",
		"agent connection state":   "meshid_agent_connected",
		"agent outage budget":      "meshid_agent_outage_budget_seconds",
		"bundle convergence":       "meshid_bundle_convergence_ratio",
		"server job variable":      "meshid_build_info",
		"agent served identities":  "meshid_agent_served_svids",
		"agent expired identities": "meshid_agent_expired_svids",
	} {
		if !slices.Contains(used, name) {
			t.Errorf("the dashboard shows no %s (%s)", topic, name)
		}
	}
}

// The check fails for a name no process exports, including a histogram
// queried by its bare name, which PromQL cannot select (only its _bucket,
// _sum and _count series exist).
func TestDashboardCheckCatchesMissingMetrics(t *testing.T) {
	exported := map[string]bool{"meshid_sign_wait_seconds_bucket": true, "meshid_sds_streams": true}
	qs := []string{
		`histogram_quantile(0.99, sum by (le) (rate(meshid_sign_wait_seconds_bucket[5m])))`,
		`sum(meshid_sds_streams{job=~"$server_job"})`,
		`rate(meshid_made_up_total[5m])`,
		`sum(rate(meshid_sign_wait_seconds[5m]))`,
	}
	miss, _ := missing(qs, exported)
	if want := []string{"meshid_made_up_total", "meshid_sign_wait_seconds"}; !slices.Equal(miss, want) {
		t.Fatalf("missing = %v, want %v", miss, want)
	}
}

// The dashboard is one a Grafana sidecar can load: a title and uid, a
// Prometheus datasource variable every target uses, and panels that all
// query something.
func TestDashboardShape(t *testing.T) {
	dash := loadDashboard(t)
	if dash["uid"] != "meshid" || dash["title"] != "meshid" {
		t.Fatalf("uid %v, title %v; want meshid", dash["uid"], dash["title"])
	}
	panels, _ := dash["panels"].([]any)
	var n int
	for _, p := range panels {
		p := p.(map[string]any)
		if p["type"] == "row" {
			continue
		}
		n++
		targets, _ := p["targets"].([]any)
		if len(targets) == 0 {
			t.Errorf("panel %q has no targets", p["title"])
		}
		for _, tg := range targets {
			tg := tg.(map[string]any)
			ds, _ := tg["datasource"].(map[string]any)
			if e, _ := tg["expr"].(string); strings.TrimSpace(e) == "" || ds["uid"] != "${datasource}" {
				t.Errorf("panel %q: target %v has no expr or does not use ${datasource}", p["title"], tg["refId"])
			}
		}
		if d, _ := p["description"].(string); d == "" {
			t.Errorf("panel %q has no description", p["title"])
		}
	}
	if n == 0 {
		t.Fatal("no panels")
	}
	t.Logf("%d panels", n)
}
