package sds_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"

	"github.com/meshid/meshid/sds"
)

// delta drives DeltaSecrets as Envoy's NewGrpcMuxImpl does.
type delta struct {
	t      *testing.T
	stream grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	resps  chan *discoveryv3.DeltaDiscoveryResponse
	errs   chan error
}

func openDelta(t *testing.T, h *harness, first *discoveryv3.DeltaDiscoveryRequest) *delta {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := dialSDS(t, h.socket).DeltaSecrets(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	d := &delta{t: t, stream: st, resps: make(chan *discoveryv3.DeltaDiscoveryResponse, 16), errs: make(chan error, 1)}
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				d.errs <- err
				return
			}
			d.resps <- r
		}
	}()
	t.Cleanup(func() { cancel(); <-d.errs })
	first.Node = envoyNode("delta-node")
	first.TypeUrl = sds.SecretTypeURL
	d.send(first)
	return d
}

func (d *delta) send(r *discoveryv3.DeltaDiscoveryRequest) {
	d.t.Helper()
	if err := d.stream.Send(r); err != nil {
		d.t.Fatal(err)
	}
}

func (d *delta) recv() *discoveryv3.DeltaDiscoveryResponse {
	d.t.Helper()
	select {
	case r := <-d.resps:
		if r.GetNonce() == "" {
			d.t.Fatal("delta response without nonce")
		}
		return r
	case err := <-d.errs:
		d.t.Fatalf("delta stream ended: %v", err)
	case <-time.After(30 * time.Second):
		d.t.Fatal("no delta response within 30s")
	}
	return nil
}

func (d *delta) ack(r *discoveryv3.DeltaDiscoveryResponse) {
	d.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResponseNonce: r.GetNonce()})
}

func byName(t *testing.T, r *discoveryv3.DeltaDiscoveryResponse) map[string]*discoveryv3.Resource {
	t.Helper()
	out := map[string]*discoveryv3.Resource{}
	for _, res := range r.GetResources() {
		var s tlsv3.Secret
		if err := res.GetResource().UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		if s.GetName() != res.GetName() || res.GetVersion() == "" {
			t.Fatalf("resource %q wraps secret %q, version %q", res.GetName(), s.GetName(), res.GetVersion())
		}
		out[res.GetName()] = res
	}
	return out
}

func TestDeltaSecrets(t *testing.T) {
	h := startServer(t, time.Hour)
	h.entry(t, idB, "unix:uid:65534")
	d := openDelta(t, h, &discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"default", "ROOTCA"}})
	r1 := d.recv()
	got := byName(t, r1)
	if len(got) != 2 || got["default"] == nil || got["ROOTCA"] == nil {
		t.Fatalf("first delta response: %v", keys(got))
	}
	d.ack(r1)

	// A forbidden name is answered with removed_resources, nothing else.
	d.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResourceNamesSubscribe: []string{idB}})
	r2 := d.recv()
	if len(r2.GetResources()) != 0 || len(r2.GetRemovedResources()) != 1 || r2.GetRemovedResources()[0] != idB {
		t.Fatalf("forbidden name: resources %v removed %v", keys(byName(t, r2)), r2.GetRemovedResources())
	}
	d.ack(r2)

	// A bundle change sends ROOTCA alone: default is unchanged.
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	r3 := d.recv()
	if got3 := byName(t, r3); len(got3) != 1 || got3["ROOTCA"] == nil || got3["ROOTCA"].GetVersion() == got["ROOTCA"].GetVersion() {
		t.Fatalf("bundle change sent %v", keys(got3))
	}
	d.ack(r3)

	// Reconnect with initial_resource_versions: the current default is not
	// re-sent, the stale ROOTCA (from before the prepare) is.
	versions := map[string]string{"default": got["default"].GetVersion(), "ROOTCA": got["ROOTCA"].GetVersion()}
	d2 := openDelta(t, h, &discoveryv3.DeltaDiscoveryRequest{
		ResourceNamesSubscribe:  []string{"default", "ROOTCA"},
		InitialResourceVersions: versions, // default current, ROOTCA stale
	})
	r4 := d2.recv()
	if got := byName(t, r4); len(got) != 1 || got["ROOTCA"] == nil {
		t.Fatalf("reconnect with versions re-sent %v, want only the stale ROOTCA", keys(got))
	}
}

func TestFetchSecrets(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	resp, err := c.FetchSecrets(context.Background(), &discoveryv3.DiscoveryRequest{
		Node: envoyNode("fetch"), ResourceNames: []string{"default", "ROOTCA"}, TypeUrl: sds.SecretTypeURL})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetVersionInfo() == "" {
		t.Fatal("fetch response without version")
	}
	var chainS, rootS *tlsv3.Secret
	for _, a := range resp.GetResources() {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		switch s.GetName() {
		case "default":
			chainS = &s
		case "ROOTCA":
			rootS = &s
		}
	}
	if chainS == nil || rootS == nil {
		t.Fatal("fetch missed a secret")
	}
	chain, key := tlsCert(t, chainS)
	if id := verifySVID(t, chain, key, trustedCA(t, rootS)); id.String() != idA {
		t.Fatalf("fetched %s", id)
	}
	// A poller (REST mode, repeated Fetch) gets the same SVID until its
	// renewal point, not a new key, certificate and inventory row per call.
	again, err := c.FetchSecrets(context.Background(), &discoveryv3.DiscoveryRequest{
		Node: envoyNode("fetch"), ResourceNames: []string{"default"}, TypeUrl: sds.SecretTypeURL})
	if err != nil {
		t.Fatal(err)
	}
	var s2 tlsv3.Secret
	if err := again.GetResources()[0].UnmarshalTo(&s2); err != nil {
		t.Fatal(err)
	}
	if chain2, _ := tlsCert(t, &s2); chain2[0].SerialNumber.Cmp(chain[0].SerialNumber) != 0 {
		t.Fatal("a second fetch minted a new SVID")
	}
}

func TestStreamEndsCleanlyWhenServerStops(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st, err := c.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("n"), ResourceNames: []string{"default"}, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	h.stop()
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream ended with %v, want a clean end (EOF)", err)
	}
}
