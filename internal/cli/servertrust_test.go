package cli

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/meshid/meshid/controlplane"
)

// kubeFlags parses args with the server's Kubernetes flags.
func kubeFlags(t *testing.T, args ...string) *serverKubeFlags {
	t.Helper()
	var k serverKubeFlags
	fs := pflag.NewFlagSet("server", pflag.ContinueOnError)
	k.register(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return &k
}

// offlineKubeconfig names an API server nobody listens on: setup makes
// clients and informers but connects to nothing.
func offlineKubeconfig(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kubeconfig")
	const kc = `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`
	if err := os.WriteFile(p, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// stop runs kr's publishers with an ended context: they stop at once and
// leave no goroutine.
func stop(t *testing.T, kr *kubeRun) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	wait, err := kr.start(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	wait()
}

// TestServerTrustFlags: the publishers are on by default but do not turn
// Kubernetes on by themselves; with a kubeconfig they are set up and
// hooked to bundle changes next to the bundle ConfigMap; bad values fail
// at start with the flag's name.
func TestServerTrustFlags(t *testing.T) {
	var cfg controlplane.Config
	kr, err := kubeFlags(t).setup(&cfg, slog.New(slog.DiscardHandler))
	if kr != nil || err != nil || cfg.OnBundleChange != nil {
		t.Fatalf("no Kubernetes settings: %v, %v", kr, err)
	}

	kc := offlineKubeconfig(t)
	kr, err = kubeFlags(t, "--kubeconfig", kc).setup(&cfg, slog.New(slog.DiscardHandler))
	if err != nil || kr == nil || len(kr.trust) != 2 || cfg.OnBundleChange == nil {
		t.Fatalf("--kubeconfig alone: %v, %+v", err, kr)
	}
	stop(t, kr)

	cfg = controlplane.Config{}
	kr, err = kubeFlags(t, "--kubeconfig", kc, "--k8s-bundle-configmap", "b", "--k8s-namespace", "meshid", "--k8s-ca-configmap-name", "").setup(&cfg, slog.New(slog.DiscardHandler))
	if err != nil || kr == nil || len(kr.trust) != 1 || kr.pub == nil {
		t.Fatalf("bundle ConfigMap and ClusterTrustBundles: %v, %+v", err, kr)
	}
	stop(t, kr)

	_, err = kubeFlags(t, "--kubeconfig", kc, "--k8s-trust-bundle-signer", "", "--k8s-ca-configmap-name", "").setup(&controlplane.Config{}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "no Kubernetes setting uses it") {
		t.Fatalf("both publishers off: %v", err)
	}
	_, err = kubeFlags(t, "--kubeconfig", kc, "--k8s-trust-bundle-signer", "noslash").setup(&controlplane.Config{}, slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatal("a signer name without a slash accepted")
	}
	// The same refusal with the bundle ConfigMap set up before it: its
	// queue must not outlive the failed start (goleak in TestMain).
	_, err = kubeFlags(t, "--kubeconfig", kc, "--k8s-bundle-configmap", "b", "--k8s-namespace", "meshid", "--k8s-trust-bundle-signer", "noslash").setup(&controlplane.Config{}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "--k8s-trust-bundle-signer") {
		t.Fatalf("bad signer: %v", err)
	}
	_, err = kubeFlags(t, "--kubeconfig", kc).setup(&controlplane.Config{TrustDomain: strings.Repeat("a", 70) + ".org"}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "label") {
		t.Fatalf("trust domain too long for a label: %v", err)
	}
}

// TestAddBundleHook: every publisher hears of a bundle change.
func TestAddBundleHook(t *testing.T) {
	var cfg controlplane.Config
	var got []int
	for i := range 3 {
		addBundleHook(&cfg, func() { got = append(got, i) })
	}
	cfg.OnBundleChange()
	if len(got) != 3 || got[0] != 0 || got[2] != 2 {
		t.Fatalf("hooks called: %v", got)
	}
}
