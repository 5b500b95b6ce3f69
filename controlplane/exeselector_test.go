package controlplane

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// unix:path and unix:sha256 entries take the values the attestor
// produces (an absolute clean path; 64 lowercase hex digits, as sha256sum
// prints) and refuse anything else with InvalidArgument, store unchanged:
// such an entry could never match.
func TestExecutableSelectorValues(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := context.Background()
	digest := strings.Repeat("0123456789abcdef", 4)
	create := func(id, value string) error {
		_, err := ts.client.CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
			SpiffeId: "spiffe://cluster.local/ns/shop/sa/" + id, Selectors: []*adminv1.Selector{{Type: "unix", Value: value}}}})
		return err
	}
	for i, v := range []string{"path:/usr/bin/envoy", "path:/opt/my app/bin:x", "sha256:" + digest} {
		if err := create("good"+string(rune('a'+i)), v); err != nil {
			t.Errorf("unix:%s: %v", v, err)
		}
	}
	for _, v := range []string{
		"path:", "path:usr/bin/envoy", "path:./envoy", "path:/usr/bin/../bin/envoy", "path:/usr/bin/envoy/",
		"sha256:", "sha256:" + strings.ToUpper(digest), "sha256:" + digest[:63], "sha256:" + digest + "0", "sha256:" + digest[:63] + "g",
	} {
		before := ts.snapshot(t)
		err := create("bad", v)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("unix:%s: %v, want InvalidArgument", v, err)
			continue
		}
		if msg := status.Convert(err).Message(); !strings.Contains(msg, strings.SplitN(v, ":", 2)[0]) || len(msg) > 300 {
			t.Errorf("unix:%s: reason %q should be one line naming the selector", v, msg)
		}
		if after := ts.snapshot(t); after != before {
			t.Errorf("unix:%s: store changed by a refused entry", v)
		}
	}
}
