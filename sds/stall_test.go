package sds_test

import (
	"context"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/sds"
)

func pushesTotal(t *testing.T, srv *controlplane.Server) float64 {
	t.Helper()
	fams, err := srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "meshid_sds_pushes_total" {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("meshid_sds_pushes_total not found")
	return 0
}

// TestClientThatDoesNotReadIsNotPushedTo: a local process that opens a
// stream and never reads must not make the server queue (and eventually
// block on) responses to it; it gets at most a few unanswered responses
// while everyone else keeps getting every push.
func TestClientThatDoesNotReadIsNotPushedTo(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	silent, err := c.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := silent.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("silent"), ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL}); err != nil {
		t.Fatal(err)
	}
	reader := openSotW(t, c, "reader", "ROOTCA")
	reader.ack(reader.recv())

	const changes = 8
	for range changes {
		// Each revocation changes the CRL in the bundle: one push each.
		svid, err := h.srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: idB, Requester: "test"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.srv.Revoke(context.Background(), "", svid.Serial, "test"); err != nil {
			t.Fatal(err)
		}
		reader.ack(reader.recv()) // the reader gets every change
	}
	// The reader's pushes (1 + changes) are all done; the silent stream got
	// at most maxUnacked (3) responses, however many changes happened.
	if got, max := pushesTotal(t, h.srv), float64(1+changes+3); got > max {
		t.Fatalf("%v pushes, want at most %v: a client that does not read is still being pushed to", got, max)
	}
}
