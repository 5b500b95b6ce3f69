package sds_test

import (
	"context"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/sds"
)

const clusterType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

// Requests are decoded and checked by the pushers, not by the stream's own
// goroutines; a wrong type still ends the stream with InvalidArgument, on
// the first request as on a later one.
func TestWrongTypeEndsStream(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	st, err := c.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("n"), ResourceNames: []string{"default"}, TypeUrl: clusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("SotW first request of another type: %v, want InvalidArgument", err)
	}

	st, err = c.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("n"), ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, TypeUrl: clusterType, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("SotW later request of another type: %v, want InvalidArgument", err)
	}

	ds, err := c.DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ds.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("n"), ResourceNamesSubscribe: []string{"default"}, TypeUrl: clusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := ds.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Delta request of another type: %v, want InvalidArgument", err)
	}
}

// Many streams on one connection all get their first secret and then the
// bundle change, each exactly once, from the shared pushers.
func TestPushReachesManyStreams(t *testing.T) {
	const n = 300
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	type stream = interface {
		Send(*discoveryv3.DiscoveryRequest) error
		Recv() (*discoveryv3.DiscoveryResponse, error)
	}
	streams := make([]stream, n)
	first := make([]*discoveryv3.DiscoveryResponse, n)
	for i := range streams {
		st, err := c.StreamSecrets(ctx)
		if err != nil {
			t.Fatal(err)
		}
		name := []string{"default", "ROOTCA"}[i%2]
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("n"), ResourceNames: []string{name}, TypeUrl: sds.SecretTypeURL}); err != nil {
			t.Fatal(err)
		}
		streams[i] = st
	}
	for i, st := range streams {
		r, err := st.Recv()
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		first[i] = r
		if err := st.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{[]string{"default", "ROOTCA"}[i%2]}, TypeUrl: sds.SecretTypeURL, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	pushed := make([]*discoveryv3.DiscoveryResponse, n)
	errs := make([]error, n)
	for i := 1; i < n; i += 2 { // the ROOTCA streams
		wg.Add(1)
		go func() {
			defer wg.Done()
			pushed[i], errs[i] = streams[i].Recv()
		}()
	}
	wg.Wait()
	for i := 1; i < n; i += 2 {
		if errs[i] != nil {
			t.Fatalf("stream %d: %v", i, errs[i])
		}
		if pushed[i].GetNonce() == first[i].GetNonce() {
			t.Fatalf("stream %d: the first response again", i)
		}
		if got := len(trustedCA(t, secrets(t, pushed[i], "ROOTCA")["ROOTCA"])); got != 2 {
			t.Fatalf("stream %d: pushed bundle has %d CAs, want 2", i, got)
		}
	}
}
