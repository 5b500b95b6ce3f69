package e2e

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// TestCARotateNowCLI: with --max-crl-serials 1 the second revocation is
// refused (exit 1, one line naming 'meshid ca rotate --now'); 'ca rotate'
// without --now is refused; 'ca rotate --now' replaces the CA, 'ca show'
// reports the tainted CA until the served SVID is re-issued, and a
// Workload API client ends up on the new CA.
func TestCARotateNowCLI(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	wsock := filepath.Join(filepath.Dir(sock), "w.sock")
	dev := startMeshid(t, "dev", "--admin-socket", sock, "--socket", wsock, "--svid-ttl", "1h", "--max-crl-serials", "1",
		"--spiffe-id", "spiffe://cluster.local/ns/dev/sa/me")
	dev.waitFor(t, "entry created")
	admin := "--admin-socket=" + sock

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+wsock)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	before, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}

	var serials []string
	for range 2 {
		dir := filepath.Join(t.TempDir(), "c")
		if _, errOut, code := runCLI(t, "x509", "mint", admin, "--spiffe-id", "spiffe://cluster.local/ns/x/sa/y", "--ttl", "30m", "--out-dir", dir); code != 0 {
			t.Fatalf("x509 mint: %s", errOut)
		}
		s, err := x509svid.Load(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"))
		if err != nil {
			t.Fatal(err)
		}
		serials = append(serials, hex.EncodeToString(s.Certificates[0].SerialNumber.Bytes()))
	}
	if _, errOut, code := runCLI(t, "revoke", admin, "--serial", serials[0]); code != 0 {
		t.Fatalf("revoke within the bound: %s", errOut)
	}
	_, errOut, code := runCLI(t, "revoke", admin, "--serial", serials[1])
	if code != 1 || !strings.Contains(errOut, "meshid ca rotate --now") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Fatalf("revoke past --max-crl-serials: exit %d, stderr %q; want exit 1 and one line naming 'meshid ca rotate --now'", code, errOut)
	}
	if _, errOut, code := runCLI(t, "ca", "rotate", admin); code != 1 || !strings.Contains(errOut, "--now") {
		t.Fatalf("ca rotate without --now: exit %d, stderr %q", code, errOut)
	}

	out, errOut, code := runCLI(t, "ca", "rotate", "--now", admin, "-o", "json")
	if code != 0 {
		t.Fatalf("ca rotate --now: %s", errOut)
	}
	var rot struct {
		CA  struct{ State, Fingerprint string } `json:"ca"`
		Old struct{ State, Fingerprint string } `json:"old"`
	}
	if err := json.Unmarshal([]byte(out), &rot); err != nil || rot.CA.State != "active" || rot.Old.State != "tainted" {
		t.Fatalf("ca rotate --now -o json = %s (%v)", out, err)
	}
	// The tainted CA leaves ca show once the served SVID is re-issued.
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _, code = runCLI(t, "ca", "show", admin, "-o", "json")
		var cas []struct{ State string }
		if err := json.Unmarshal([]byte(out), &cas); code != 0 || err != nil {
			t.Fatalf("ca show -o json: %v %s", err, out)
		}
		if len(cas) == 1 && cas[0].State == "active" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ca show still lists the old CA 30s after the rotation: %s", out)
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, with a deadline
	}
	for {
		after, err := src.GetX509SVID()
		if err == nil && after.Certificates[0].SerialNumber.Cmp(before.Certificates[0].SerialNumber) != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Workload API client still holds its SVID from the old CA")
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	// The old CA's revocations are gone: the bound has room again.
	if _, errOut, code := runCLI(t, "revoke", admin, "--serial", serials[1]); code != 0 {
		t.Fatalf("revoke after the rotation: %s", errOut)
	}
}
