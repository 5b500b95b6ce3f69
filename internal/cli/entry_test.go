package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// cliServer runs a real server in-process on a real admin socket, on a
// store that already holds what an older version accepted.
func cliServer(t *testing.T, old ...store.Entry) (*controlplane.Server, string) {
	t.Helper()
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range old {
		if err := bs.CreateEntry(context.Background(), e, store.AuditEvent{Action: "entry.create", Target: e.ID}); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := controlplane.Open(context.Background(), controlplane.Config{DataDir: dir, Store: bs, CATTL: 48 * time.Hour, SVIDTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-cli-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(sockDir, "admin", "admin.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, controlplane.Endpoints{AdminSocket: socket}, func(controlplane.Listening) { close(ready) })
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
		srv.Close()
		os.RemoveAll(sockDir)
	})
	return srv, socket
}

func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code := Main(ctx, args, &out, &errb)
	return out.String(), errb.String(), code
}

// TestEntryCommands: show, update, --hint and --page-size, and a table
// that never prints a stored control character raw.
func TestEntryCommands(t *testing.T) {
	evil := store.Entry{
		ID: "old-entry", SpiffeID: "spiffe://cluster.local/ns/x\x1b[2J/sa/y",
		Selectors: []store.Selector{{Type: "k8s", Value: "ns:shop\x1b[31m\nFAKE ROW"}}, CreatedAt: time.Now(),
	}
	srv, sock := cliServer(t, evil)
	admin := "--admin-socket=" + sock

	for _, args := range [][]string{{"entry", "list", admin}, {"entry", "show", "old-entry", admin}} {
		out, errOut, code := run(t, args...)
		if code != 0 {
			t.Fatalf("%v: %s", args, errOut)
		}
		if strings.ContainsAny(out, "\x1b\r") || strings.Contains(out, "\nFAKE ROW") {
			t.Fatalf("%v printed a raw control character:\n%q", args, out)
		}
		if !strings.Contains(out, `\x1b[31m\nFAKE ROW`) {
			t.Fatalf("%v does not show the escaped selector:\n%s", args, out)
		}
	}

	_, errOut, code := run(t, "entry", "show", "no-such-entry", admin)
	if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "not found") {
		t.Fatalf("show of a missing entry: exit %d, %q", code, errOut)
	}

	out, errOut, code := run(t, "entry", "create", admin, "--spiffe-id", "spiffe://cluster.local/ns/shop/sa/web",
		"--selector", "unix:uid:1000", "--hint", "web", "-o", "json")
	if code != 0 {
		t.Fatalf("create: %s", errOut)
	}
	var created struct{ ID, Hint string }
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.Hint != "web" {
		t.Fatalf("create --hint: %v %s", err, out)
	}

	showJSON := func() string {
		t.Helper()
		out, errOut, code := run(t, "entry", "show", created.ID, admin, "-o", "json")
		if code != 0 {
			t.Fatalf("show: %s", errOut)
		}
		return out
	}
	before := showJSON()
	_, errOut, code = run(t, "entry", "update", created.ID, admin, "--dns", "10.0.0.1")
	if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "IP address") {
		t.Fatalf("update to an IP SAN: exit %d, %q", code, errOut)
	}
	if after := showJSON(); after != before {
		t.Fatalf("refused update changed the entry:\n%s\nwas\n%s", after, before)
	}
	if _, errOut, code = run(t, "entry", "update", created.ID, admin, "--ttl", "2h", "--dns", "web.shop.svc"); code != 0 {
		t.Fatalf("update: %s", errOut)
	}
	var shown struct {
		TTL      string   `json:"ttl"`
		DNSNames []string `json:"dns_names"`
		Hint     string
	}
	if err := json.Unmarshal([]byte(showJSON()), &shown); err != nil || shown.TTL != "7200s" || len(shown.DNSNames) != 1 || shown.Hint != "web" {
		t.Fatalf("after update: %+v %v", shown, err)
	}

	// More entries than one page, listed with a small server page.
	for i := range 9 {
		if _, err := srv.CreateEntry(context.Background(), controlplane.EntrySpec{
			SpiffeID: fmt.Sprintf("spiffe://cluster.local/ns/shop/sa/w%d", i), Selectors: []store.Selector{{Type: "unix", Value: "uid:1000"}},
		}, "test"); err != nil {
			t.Fatal(err)
		}
		if _, err := srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: "spiffe://cluster.local/ns/shop/sa/web", Requester: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{{"entry", "list"}, {"certs", "list"}} {
		out, errOut, code = run(t, append(args, admin, "--page-size", "2", "-o", "json")...)
		if code != 0 {
			t.Fatalf("%v: %s", args, errOut)
		}
		var rows []json.RawMessage
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("%v -o json is not one array: %v", args, err)
		}
		want := 11
		if args[0] == "certs" {
			want = 9
		}
		if len(rows) != want {
			t.Fatalf("%v --page-size 2 listed %d rows, want %d", args, len(rows), want)
		}
	}
	if _, errOut, code = run(t, "entry", "list", admin, "--page-size", "-1"); code != 1 {
		t.Fatalf("negative --page-size accepted: %s", errOut)
	}
}
