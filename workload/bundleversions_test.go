package workload_test

import (
	"context"
	"maps"
	"os"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/workload"
)

// X.509 watchers count under the bundle version of the last response they
// were sent, JWT bundle watchers not at all, and a closed watcher stops
// counting.
func TestBundleVersionsCountSentBundle(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := metadata.AppendToOutgoingContext(testCtx(t), workload.HeaderKey, "true")
	version := func() string {
		sub, err := h.srv.Subscribe(ctx, identity.Caller{})
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
		return sub.Snapshot().Bundles[0].Version
	}
	wait := func(want map[string]int) {
		t.Helper()
		deadline := time.Now().Add(waitLong)
		for !maps.Equal(h.wl.BundleVersions(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("BundleVersions = %v, want %v", h.wl.BundleVersions(), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	c := h.raw(t)
	svids, err := c.FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svids.Recv(); err != nil {
		t.Fatal(err)
	}
	bctx, cancelBundles := context.WithCancel(ctx)
	bundles, err := c.FetchX509Bundles(bctx, &pb.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bundles.Recv(); err != nil {
		t.Fatal(err)
	}
	jwt, err := c.FetchJWTBundles(ctx, &pb.JWTBundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.Recv(); err != nil {
		t.Fatal(err)
	}
	v1 := version()
	wait(map[string]int{v1: 2})

	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	v2 := version()
	if v2 == v1 {
		t.Fatal("bundle version did not change with a prepared CA")
	}
	if _, err := svids.Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := bundles.Recv(); err != nil {
		t.Fatal(err)
	}
	wait(map[string]int{v2: 2})
	cancelBundles()
	wait(map[string]int{v2: 1})
}
