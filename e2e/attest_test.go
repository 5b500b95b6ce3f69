package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// The server's workload socket attests callers by their executable: entries
// made with the CLI for unix:path and unix:sha256 of the program calling
// (this test binary) give it those identities, and one for another path
// does not.
func TestWorkloadSocketExecutableSelectors(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	wsock := filepath.Join(filepath.Dir(sock), "w.sock")
	srv := startMeshid(t, "server", "--data-dir", t.TempDir(), "--admin-socket", sock, "--socket", wsock)
	srv.waitFor(t, "msg=serving")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(bin)
	const byPath, byHash, other = "spiffe://cluster.local/ns/e2e/sa/by-path", "spiffe://cluster.local/ns/e2e/sa/by-hash", "spiffe://cluster.local/ns/e2e/sa/other"
	for _, e := range [][2]string{
		{byPath, "unix:path:" + self},
		{byHash, "unix:sha256:" + hex.EncodeToString(sum[:])},
		{other, "unix:path:" + self + ".other"},
	} {
		if _, errOut, code := runCLI(t, "entry", "create", "--admin-socket", sock, "--spiffe-id", e[0], "--selector", e[1]); code != 0 {
			t.Fatalf("entry create %s: %s", e[1], errOut)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svids, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr("unix://"+wsock))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range svids {
		got = append(got, s.ID.String())
	}
	slices.Sort(got)
	if want := []string{byHash, byPath}; !slices.Equal(got, want) {
		t.Fatalf("identities %v, want %v", got, want)
	}
}
