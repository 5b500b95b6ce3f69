package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// An entry naming a selector kind that no attestor of this server produces
// could never match; creating one, or updating an entry to one, is
// refused with InvalidArgument, a reason naming the attestor that would
// produce it, and the store unchanged.
func TestEntryWithUnproducedSelectorKindRefused(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := context.Background()
	web := "spiffe://cluster.local/ns/shop/sa/web"
	uid := &adminv1.Selector{Type: "unix", Value: "uid:1000"}
	created, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: []*adminv1.Selector{uid}}})
	if err != nil {
		t.Fatal(err)
	}
	id := created.GetEntry().GetId()
	for _, tt := range []struct {
		name string
		sels []*adminv1.Selector
		want string
	}{
		{"k8s:ns Kubernetes refuses", []*adminv1.Selector{{Type: "k8s", Value: "ns:Shop"}}, `k8s:ns:Shop: "Shop" is not a DNS-1123 label`},
		{"k8s:sa beside a unix selector", []*adminv1.Selector{uid, {Type: "k8s", Value: "sa:DB"}}, "is not a DNS-1123 subdomain"},
		{"k8s:pod-label without a value", []*adminv1.Selector{uid, {Type: "k8s", Value: "pod-label:app"}}, "KEY:VALUE"},
		{"token:id", []*adminv1.Selector{uid, {Type: "token", Value: "id:spiffe://cluster.local/agent"}}, "token:id is produced by no attestor"},
	} {
		for _, op := range []string{"create", "update"} {
			t.Run(op+" "+tt.name, func(t *testing.T) {
				before := ts.snapshot(t)
				stored, err := ts.srv.store.GetEntry(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				if op == "create" {
					_, err = ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web + "/other", Selectors: tt.sels}})
				} else {
					_, err = ts.client.UpdateEntry(ctx, &adminv1.UpdateEntryRequest{Id: id, Selectors: tt.sels})
				}
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("got %v, want InvalidArgument", err)
				}
				if msg := status.Convert(err).Message(); !strings.Contains(msg, tt.want) || len(msg) > 300 {
					t.Fatalf("reason %q: want one line saying %q", msg, tt.want)
				}
				if after := ts.snapshot(t); after != before {
					t.Fatalf("store changed by a refused entry: before %+v after %+v", before, after)
				}
				now, err := ts.srv.store.GetEntry(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(now) != fmt.Sprint(stored) {
					t.Fatalf("entry changed by a refused update: %+v, was %+v", now, stored)
				}
			})
		}
	}
}

// Every kind the workload socket's attestors produce is one an entry may
// name, and nothing else is: the two come from one Set.
func TestEntrySelectorKindsAreTheAttestorsKinds(t *testing.T) {
	for _, k := range attestors.Kinds() {
		if by, ok := attestors.Producer(k.String()); !ok || by != k.Type {
			t.Errorf("kind %s: producer %q %v", k, by, ok)
		}
		if _, err := ParseSelector(k.String()); err == nil || !strings.Contains(err.Error(), "want "+k.String()+":") {
			t.Errorf("%s without a value: %v, want the form asked for", k, err)
		}
	}
	if _, err := ParseSelector("k8s:ns:shop"); err != nil {
		t.Errorf("k8s:ns:shop, which the agents' k8s attestor produces: %v", err)
	}
}
