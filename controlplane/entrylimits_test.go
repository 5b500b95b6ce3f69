package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// TestEntryLimitsAndValidation: entries and mints the CA could not sign,
// or that break listing or terminals, are refused with InvalidArgument, a
// short reason naming the limit, and no change to the store.
func TestEntryLimitsAndValidation(t *testing.T) {
	ts := startServer(t, Config{CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	ctx := context.Background()
	web := "spiffe://cluster.local/ns/shop/sa/web"
	sel := []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}}
	created, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: sel}})
	if err != nil {
		t.Fatal(err)
	}
	id := created.GetEntry().GetId()
	create := func(e *adminv1.Entry) func() error {
		return func() error {
			if e.SpiffeId == "" {
				e.SpiffeId = web + "/other"
			}
			if e.Selectors == nil {
				e.Selectors = sel
			}
			_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: e})
			return err
		}
	}
	update := func(req *adminv1.UpdateEntryRequest) func() error {
		return func() error {
			req.Id = id
			_, err := ts.client.UpdateEntry(ctx, req)
			return err
		}
	}
	manySelectors := make([]*adminv1.Selector, MaxSelectorsPerEntry+1)
	for i := range manySelectors {
		manySelectors[i] = &adminv1.Selector{Type: "unix", Value: fmt.Sprintf("gid:%d", i)}
	}
	manyDNS := make([]string, MaxDNSNamesPerEntry+1)
	for i := range manyDNS {
		manyDNS[i] = fmt.Sprintf("h%d.example.com", i)
	}
	hint := "x\x1b[2J"
	tests := []struct {
		name string
		call func() error
		want string // in the reason
	}{
		{"dns name that is an IP address", create(&adminv1.Entry{DnsNames: []string{"10.0.0.1"}}), "IP address"},
		{"wildcard over a top-level domain", create(&adminv1.Entry{DnsNames: []string{"*.com"}}), "wildcard"},
		{"spiffe id over 2048 bytes", create(&adminv1.Entry{SpiffeId: web + "/" + strings.Repeat("a", 100_000)}), "2048"},
		{"too many selectors", create(&adminv1.Entry{Selectors: manySelectors}), "64"},
		{"selector over 256 bytes", create(&adminv1.Entry{Selectors: []*adminv1.Selector{{Type: "unix", Value: "path:/" + strings.Repeat("n", 300)}}}), "256"},
		{"too many dns names", create(&adminv1.Entry{DnsNames: manyDNS}), "32"},
		{"selector with a control character", create(&adminv1.Entry{Selectors: []*adminv1.Selector{{Type: "unix", Value: "path:/usr/bin/shop\x1b[2J"}}}), "non-printable"},
		{"selector with a line separator", create(&adminv1.Entry{Selectors: []*adminv1.Selector{{Type: "unix", Value: "path:/usr/bin/shop\u2028"}}}), "non-printable"},
		{"hint with a control character", create(&adminv1.Entry{Hint: hint}), "non-printable"},
		{"sub-second entry ttl", create(&adminv1.Entry{Ttl: durationpb.New(500 * time.Millisecond)}), "at least 1m0s"},
		{"entry ttl under a minute", create(&adminv1.Entry{Ttl: durationpb.New(59 * time.Second)}), "remaining life"},
		{"mint with a sub-second ttl", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, Ttl: durationpb.New(time.Second)})
			return err
		}, "at least 1m0s"},
		{"mint with an IP address as dns name", func() error {
			_, err := ts.client.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: web, DnsNames: []string{"10.0.0.1"}})
			return err
		}, "IP address"},
		{"update to an IP dns name", update(&adminv1.UpdateEntryRequest{UpdateDnsNames: true, DnsNames: []string{"10.0.0.1"}}), "IP address"},
		{"update to a sub-second ttl", update(&adminv1.UpdateEntryRequest{Ttl: durationpb.New(time.Millisecond)}), "at least 1m0s"},
		{"update to a ttl beyond the CA", update(&adminv1.UpdateEntryRequest{Ttl: durationpb.New(72 * time.Hour)}), "remaining life"},
		{"update to too many selectors", update(&adminv1.UpdateEntryRequest{Selectors: manySelectors}), "64"},
		{"update with a control character in the hint", update(&adminv1.UpdateEntryRequest{Hint: &hint}), "non-printable"},
		{"pid selector without the uid that owns it", create(&adminv1.Entry{Selectors: []*adminv1.Selector{{Type: "unix", Value: "pid:4242"}}}), "unix:uid"},
		{"update to a pid selector without a uid", update(&adminv1.UpdateEntryRequest{Selectors: []*adminv1.Selector{{Type: "unix", Value: "pid:4242"}, {Type: "unix", Value: "gid:0"}}}), "unix:uid"},
		{"update with nothing to change", update(&adminv1.UpdateEntryRequest{}), "nothing to update"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := ts.snapshot(t)
			stored, err := ts.srv.store.GetEntry(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			err = tt.call()
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", err)
			}
			msg := status.Convert(err).Message()
			if len(msg) > 300 || !strings.Contains(msg, tt.want) {
				t.Fatalf("reason %q: want one short line naming %q", msg, tt.want)
			}
			if strings.ContainsAny(msg, "\x1b\n\u2028") {
				t.Fatalf("reason %q echoes a control character", msg)
			}
			if after := ts.snapshot(t); after != before {
				t.Fatalf("store changed by a failed request: before %+v after %+v", before, after)
			}
			now, err := ts.srv.store.GetEntry(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(now) != fmt.Sprint(stored) {
				t.Fatalf("entry changed by a failed request: %+v, was %+v", now, stored)
			}
		})
	}
}

// TestGetAndUpdateEntry: show and update through the admin API.
func TestGetAndUpdateEntry(t *testing.T) {
	ts := startServer(t, Config{CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	ctx := context.Background()
	web := "spiffe://cluster.local/ns/shop/sa/web"
	sel := []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}}
	c, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: sel, Hint: "web"}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{SpiffeId: web, Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:2000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	id := c.GetEntry().GetId()
	got, err := ts.client.GetEntry(ctx, &adminv1.GetEntryRequest{Id: id})
	if err != nil || !proto.Equal(got.GetEntry(), c.GetEntry()) || got.GetEntry().GetHint() != "web" {
		t.Fatalf("get entry: %v %v, want %v", got, err, c.GetEntry())
	}
	if _, err := ts.client.GetEntry(ctx, &adminv1.GetEntryRequest{Id: "no-such-entry"}); status.Code(err) != codes.NotFound {
		t.Fatalf("get of a missing entry: %v, want NotFound", err)
	}
	if _, err := ts.client.UpdateEntry(ctx, &adminv1.UpdateEntryRequest{Id: "no-such-entry", Ttl: durationpb.New(time.Hour)}); status.Code(err) != codes.NotFound {
		t.Fatalf("update of a missing entry: %v, want NotFound", err)
	}
	// Updating into another entry's SPIFFE ID and selectors is a duplicate.
	before := ts.snapshot(t)
	if _, err := ts.client.UpdateEntry(ctx, &adminv1.UpdateEntryRequest{Id: other.GetEntry().GetId(), Selectors: sel}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("update into a duplicate: %v, want AlreadyExists", err)
	}
	if after := ts.snapshot(t); after != before {
		t.Fatalf("store changed by a refused update: %+v, was %+v", after, before)
	}

	empty := ""
	up, err := ts.client.UpdateEntry(ctx, &adminv1.UpdateEntryRequest{
		Id: id, UpdateDnsNames: true, DnsNames: []string{"web.shop.svc"}, Ttl: durationpb.New(2 * time.Hour), Hint: &empty,
		Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:1001"}, {Type: "unix", Value: "gid:50"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err = ts.client.GetEntry(ctx, &adminv1.GetEntryRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	e := got.GetEntry()
	if !proto.Equal(e, up.GetEntry()) || e.GetHint() != "" || e.GetTtl().AsDuration() != 2*time.Hour ||
		len(e.GetDnsNames()) != 1 || len(e.GetSelectors()) != 2 || e.GetSelectors()[0].GetValue() != "gid:50" {
		t.Fatalf("after update: %v", e)
	}
	// The index follows: the old selectors no longer match, the new do.
	if m := ts.srv.MatchEntries([]string{"unix:uid:1000"}); len(m) != 0 {
		t.Fatalf("old selectors still match %v", m)
	}
	if m := ts.srv.MatchEntries([]string{"unix:uid:1001", "unix:gid:50"}); len(m) != 1 || m[0].ID != id {
		t.Fatalf("new selectors match %v", m)
	}
}

// TestListingsPaginateAnyStore: a store with more entries than one page,
// and one with entries and inventory rows stored by older versions without
// size limits (together far over gRPC's 4 MiB), list fully, page by page.
func TestListingsPaginateAnyStore(t *testing.T) {
	ts := startServer(t, Config{CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	ctx := context.Background()
	want := map[string]bool{}
	for i := range 25 {
		r, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
			SpiffeId: fmt.Sprintf("spiffe://cluster.local/ns/shop/sa/w%d", i), Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:1000"}}}})
		if err != nil {
			t.Fatal(err)
		}
		want[r.GetEntry().GetId()] = true
	}
	listEntries := func(pageSize int32) (map[string]bool, int) {
		t.Helper()
		got, pages, token := map[string]bool{}, 0, ""
		for {
			resp, err := ts.client.ListEntries(ctx, &adminv1.ListEntriesRequest{PageSize: pageSize, PageToken: token})
			if err != nil {
				t.Fatalf("list entries page %d: %v", pages, err)
			}
			pages++
			if pageSize > 0 && len(resp.GetEntries()) > int(pageSize) {
				t.Fatalf("page of %d entries, asked for %d", len(resp.GetEntries()), pageSize)
			}
			for _, e := range resp.GetEntries() {
				if got[e.GetId()] {
					t.Fatalf("entry %s listed twice", e.GetId())
				}
				got[e.GetId()] = true
			}
			if token = resp.GetNextPageToken(); token == "" {
				return got, pages
			}
		}
	}
	got, pages := listEntries(7)
	if len(got) != len(want) || pages != 4 {
		t.Fatalf("listed %d entries in %d pages, want %d in 4", len(got), pages, len(want))
	}

	// Entries an older version accepted: 100 KB SPIFFE IDs, written with
	// the store. 60 of them are 6 MB.
	now := time.Now()
	for i := range 60 {
		e := store.Entry{
			ID:        fmt.Sprintf("old-%03d", i),
			SpiffeID:  fmt.Sprintf("spiffe://cluster.local/%d/%s", i, strings.Repeat("x", 100_000)),
			Selectors: []store.Selector{{Type: "unix", Value: "uid:4242"}},
			CreatedAt: now,
		}
		if err := ts.srv.store.CreateEntry(ctx, e, store.AuditEvent{Action: "entry.create", Target: e.ID}); err != nil {
			t.Fatal(err)
		}
		want[e.ID] = true
		if err := ts.srv.store.RecordSVID(ctx, store.IssuedSVID{
			Serial: fmt.Sprintf("%040x", i+1), SpiffeID: e.SpiffeID, NotBefore: now, NotAfter: now.Add(time.Hour), IssuedAt: now,
		}); err != nil {
			t.Fatal(err)
		}
	}
	got, pages = listEntries(0)
	if len(got) != len(want) || pages < 2 {
		t.Fatalf("listed %d entries in %d pages, want %d in several", len(got), pages, len(want))
	}
	certs, pages, token := 0, 0, ""
	for {
		resp, err := ts.client.ListCerts(ctx, &adminv1.ListCertsRequest{PageToken: token})
		if err != nil {
			t.Fatalf("list certs page %d: %v", pages, err)
		}
		pages++
		certs += len(resp.GetCerts())
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if certs != 60 || pages < 2 {
		t.Fatalf("listed %d certs in %d pages, want 60 in several", certs, pages)
	}
}

// TestJWTTTLBelowMinimumRefused: --jwt-ttl 10s would issue tokens that
// expire before most round trips finish; the server refuses to start.
func TestJWTTTLBelowMinimumRefused(t *testing.T) {
	_, err := Open(context.Background(), Config{DataDir: t.TempDir(), JWTTTL: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "at least 30s") {
		t.Fatalf("open with a 10s jwt ttl: %v, want a refusal naming the 30s minimum", err)
	}
}
