package trustpublish_test

import (
	"context"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/k8stest"
	"github.com/meshid/meshid/kube/trustpublish"
)

// pemCerts splits a PEM bundle into its certificates, sorted.
func pemCerts(b []byte) []string {
	var out []string
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		out = append(out, string(pem.EncodeToMemory(blk)))
	}
	sort.Strings(out)
	return out
}

// TestServerCARotation: a real server's CA rotation (prepare, activate)
// reaches the ClusterTrustBundles and ConfigMaps through OnBundleChange:
// both CAs during the overlap, only the new one once the old has left the
// server's bundle.
func TestServerCARotation(t *testing.T) {
	bed := k8stest.Shared(t)
	ctx := context.Background()
	ns := bed.Namespace(t)
	name := cmName(t)
	td := randomTD(t)

	var srvP atomic.Pointer[controlplane.Server]
	bundle := func() []byte {
		if s := srvP.Load(); s != nil {
			return s.BundlePEM()
		}
		return nil
	}
	ctbs, err := trustpublish.NewBundles(trustpublish.BundlesConfig{Client: bed.Client, SignerName: signer, TrustDomain: td, Bundle: bundle, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	cms := trustpublish.NewConfigMaps(trustpublish.ConfigMapsConfig{Client: bed.Client, Name: name, Bundle: bundle, Log: slog.New(slog.DiscardHandler)})
	srv, err := controlplane.Open(ctx, controlplane.Config{DataDir: t.TempDir(), TrustDomain: td, DisableAutoRotate: true,
		Logger: slog.New(slog.DiscardHandler), OnBundleChange: func() { ctbs.Kick(); cms.Kick() }})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-trust-")
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(rctx, controlplane.Endpoints{AdminSocket: filepath.Join(sockDir, "admin.sock")}, func(controlplane.Listening) { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		if err := srv.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		os.RemoveAll(sockDir)
	})
	srvP.Store(srv)
	run(t, ctbs)
	run(t, cms)

	// Both fronts equal the server's bundle, which has n CAs.
	check := func(what string, n int) []string {
		t.Helper()
		want := pemCerts(srv.BundlePEM())
		if len(want) != n {
			t.Fatalf("%s: the server's bundle has %d CAs, want %d", what, len(want), n)
		}
		eventually(t, 20*time.Second, what, func() (bool, string) {
			got := projected(t, bed.Client, signer, td)
			return slices.Equal(got, want), fmt.Sprintf("%d of %d CAs projected", len(got), len(want))
		})
		waitCM(t, bed.Client, ns, name, string(srv.BundlePEM()), what+" (configmap)")
		return want
	}
	first := check("first CA", 1)
	if _, err := srv.PrepareCA(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	overlap := check("rotation overlap", 2)
	if _, err := srv.ActivateCA(ctx, "test", true); err != nil {
		t.Fatal(err)
	}
	// Nothing was signed by the old CA, so it leaves the bundle at once.
	last := check("old CA retired", 1)
	if slices.Contains(last, first[0]) || !slices.Contains(overlap, last[0]) {
		t.Fatal("the CA left is not the one prepared")
	}
}
