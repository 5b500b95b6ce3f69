package e2e

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/yaml"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

const (
	agentWeb1 = "spiffe://cluster.local/meshid/agent/join/web-1"
	agentWeb2 = "spiffe://cluster.local/meshid/agent/join/web-2"
)

// An operator pins an entry to one node agent with --parent-id, sees the
// parent in show, list and their json/yaml forms, moves and clears it with
// update, and registers the same SPIFFE ID and selectors once per parent.
// A parent that is not an agent of this trust domain is refused with
// InvalidArgument, one line, and nothing stored.
func TestEntryParentCLI(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	srv := startMeshid(t, "server", "--data-dir", t.TempDir(), "--admin-socket", sock, "--socket", filepath.Join(filepath.Dir(sock), "w.sock"))
	srv.waitFor(t, "msg=serving")
	admin := "--admin-socket=" + sock
	const web = "spiffe://cluster.local/ns/shop/sa/web"

	create := func(parent string) *adminv1.Entry {
		t.Helper()
		args := []string{"entry", "create", admin, "--spiffe-id", web, "--selector", "unix:uid:1000", "-o", "json"}
		if parent != "" {
			args = append(args, "--parent-id", parent)
		}
		stdout, stderr, code := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		return entryJSON(t, stdout)
	}
	pinned := create(agentWeb1)
	if pinned.GetParentId() != agentWeb1 {
		t.Fatalf("created entry's parent %q, want %s", pinned.GetParentId(), agentWeb1)
	}
	// The same pair without a parent and under another agent are other
	// entries; under the same agent it is a duplicate.
	free := create("")
	create(agentWeb2)
	dupArgs := []string{"entry", "create", admin, "--spiffe-id", web, "--selector", "unix:uid:1000", "--parent-id", agentWeb1}
	stdout, stderr, code := runCLI(t, dupArgs...)
	oneLineError(t, dupArgs, stdout, stderr, code)
	if !strings.Contains(stderr, "already exists") || !strings.Contains(stderr, agentWeb1) {
		t.Errorf("duplicate under one parent: %q, want an already-exists naming the parent", stderr)
	}

	stdout, stderr, code = runCLI(t, "entry", "show", admin, pinned.GetId())
	if code != 0 || !strings.Contains(stdout, "PARENT") || !strings.Contains(stdout, agentWeb1) {
		t.Fatalf("entry show: exit %d, %q %q; want a PARENT line with %s", code, stdout, stderr, agentWeb1)
	}
	stdout, _, _ = runCLI(t, "entry", "show", admin, free.GetId())
	if !strings.Contains(stdout, "PARENT") || !strings.Contains(stdout, "(none") {
		t.Fatalf("entry show of a parentless entry: %q, want PARENT (none...)", stdout)
	}
	stdout, stderr, code = runCLI(t, "entry", "show", admin, pinned.GetId(), "-o", "yaml")
	if code != 0 || !strings.Contains(stdout, "parent_id: "+agentWeb1) {
		t.Fatalf("entry show -o yaml: exit %d, %q %q; want parent_id", code, stdout, stderr)
	}
	stdout, _, _ = runCLI(t, "entry", "list", admin)
	header, rows, _ := strings.Cut(stdout, "\n")
	if !strings.HasSuffix(strings.TrimSpace(header), "PARENT") || strings.Count(rows, agentWeb1) != 1 || strings.Count(rows, agentWeb2) != 1 {
		t.Fatalf("entry list table:\n%s\nwant a PARENT column with each parent once", stdout)
	}
	stdout, _, _ = runCLI(t, "entry", "list", admin, "-o", "yaml")
	var listed []map[string]any
	if err := yaml.Unmarshal([]byte(stdout), &listed); err != nil {
		t.Fatalf("entry list -o yaml: %v\n%s", err, stdout)
	}
	parents := map[string]string{}
	for _, e := range listed {
		parents[e["id"].(string)], _ = e["parent_id"].(string)
	}
	if parents[pinned.GetId()] != agentWeb1 || parents[free.GetId()] != "" {
		t.Fatalf("entry list -o yaml parents %v", parents)
	}

	// Refused parents: exit 1, one line, the store unchanged.
	before, _, _ := runCLI(t, "entry", "list", admin, "-o", "json")
	for _, bad := range []string{
		"spiffe://cluster.local/ns/shop/sa/web",           // a workload, not an agent
		"spiffe://other.org/meshid/agent/join/web-1",      // another trust domain
		"spiffe://cluster.local/meshid/server",            // the server
		"web-1",                                           // not a SPIFFE ID
		"spiffe://cluster.local/meshid/agent/join/../web", // not a valid path
	} {
		for _, args := range [][]string{
			{"entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/other", "--selector", "unix:uid:1", "--parent-id", bad},
			{"entry", "update", admin, free.GetId(), "--parent-id", bad},
		} {
			stdout, stderr, code := runCLI(t, args...)
			oneLineError(t, args, stdout, stderr, code)
			if !strings.Contains(stderr, "parent id") {
				t.Errorf("%v: %q does not name the parent id", args, stderr)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := adminClient(t, sock).CreateEntry(ctx, &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
			SpiffeId: "spiffe://cluster.local/ns/shop/sa/other", ParentId: bad,
			Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:1"}}}})
		cancel()
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateEntry with parent %q: %v, want InvalidArgument", bad, err)
		}
	}
	if after, _, _ := runCLI(t, "entry", "list", admin, "-o", "json"); after != before {
		t.Fatalf("refused parents changed the entries:\nbefore %s\nafter  %s", before, after)
	}

	// update moves the parent, and --parent-id "" clears it; clearing onto
	// the parentless twin is a duplicate.
	stdout, stderr, code = runCLI(t, "entry", "update", admin, pinned.GetId(), "--parent-id", "spiffe://cluster.local/meshid/agent/join/web-3", "-o", "json")
	if code != 0 || entryJSON(t, stdout).GetParentId() != "spiffe://cluster.local/meshid/agent/join/web-3" {
		t.Fatalf("entry update --parent-id: exit %d %q %q", code, stdout, stderr)
	}
	clearArgs := []string{"entry", "update", admin, pinned.GetId(), "--parent-id", ""}
	stdout, stderr, code = runCLI(t, clearArgs...)
	oneLineError(t, clearArgs, stdout, stderr, code)
	if _, stderr, code := runCLI(t, "entry", "delete", admin, free.GetId()); code != 0 {
		t.Fatalf("entry delete: %s", stderr)
	}
	stdout, stderr, code = runCLI(t, append(clearArgs, "-o", "json")...)
	if code != 0 || entryJSON(t, stdout).GetParentId() != "" {
		t.Fatalf("entry update --parent-id '': exit %d %q %q", code, stdout, stderr)
	}
}

// entryJSON decodes an entry printed with -o json.
func entryJSON(t *testing.T, s string) *adminv1.Entry {
	t.Helper()
	var m struct {
		ID       string `json:"id"`
		ParentID string `json:"parent_id"`
	}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("not an entry in json: %v\n%s", err, s)
	}
	return &adminv1.Entry{Id: m.ID, ParentId: m.ParentID}
}
