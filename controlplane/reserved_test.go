package controlplane

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// TestReservedIDsCannotBeGranted: the server's own identity (and anything
// else under spiffe://<td>/meshid/) is never granted by an entry or a join
// token, over the real admin API, and a refusal leaves the store unchanged.
func TestReservedIDsCannotBeGranted(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := context.Background()
	sel := []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}}
	before := ts.snapshot(t)
	for _, id := range []string{
		ts.srv.ServerID().String(),
		"spiffe://cluster.local/meshid",
		"spiffe://cluster.local/meshid/agent/node-1",
	} {
		_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: id, Selectors: sel}})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("entry for %s: %v, want InvalidArgument naming the reservation", id, err)
		}
		_, err = ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: id})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("x509 mint of %s: %v, want InvalidArgument naming the reservation", id, err)
		}
		_, err = ts.client.CreateJoinToken(ctx, &adminv1.CreateJoinTokenRequest{SpiffeId: id, Ttl: durationpb.New(time.Hour)})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("token for %s: %v, want InvalidArgument naming the reservation", id, err)
		}
	}
	if after := ts.snapshot(t); after != before {
		t.Fatalf("refused requests changed the store: %+v -> %+v", before, after)
	}
	// Neighbours of the prefix are ordinary workload IDs.
	for _, id := range []string{"spiffe://cluster.local/meshidx/a", "spiffe://cluster.local/ns/meshid/sa/server"} {
		if _, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: id, Selectors: sel}}); err != nil {
			t.Errorf("entry for %s: %v", id, err)
		}
	}
}
