package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The k8s workload attestor's flags are checked before the agent starts:
// asked for without Kubernetes, with a kubeconfig that cannot be read, or
// without the node's name, the agent exits 1 with a one-line reason.
func TestAgentK8sFlags(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("NODE_NAME", "")
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"agent", "--server", "127.0.0.1:1", "--insecure-bootstrap", "--join-token", "mat_x",
		"--data-dir", filepath.Join(dir, "data"), "--socket", filepath.Join(dir, "w.sock")}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--k8s-workload-attestor"}, "--k8s-workload-attestor: no --kubeconfig and not running in a Kubernetes pod (give --kubeconfig)"},
		{[]string{"--kubeconfig", filepath.Join(dir, "missing")}, "kubeconfig " + filepath.Join(dir, "missing")},
		{[]string{"--kubeconfig", kubeconfig}, "the node's name is unknown: pass --node-name or set NODE_NAME"},
	} {
		_, errOut, code := run(t, append(append([]string{}, base...), tc.args...)...)
		if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line with %q", tc.args, code, errOut, tc.want)
		}
	}
}
