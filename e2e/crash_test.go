package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/ca"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

func adminClient(t *testing.T, sock string) adminv1.AdminServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return adminv1.NewAdminServiceClient(conn)
}

// TestKill9DuringIssuance kills the server with SIGKILL while 8 clients are
// minting, then checks that the store opens, holds the same CA, passes a
// consistency check, and records every SVID a client received.
func TestKill9DuringIssuance(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(sockDir(t), "admin.sock")
	srv := startMeshid(t, "server", "--data-dir", dir, "--admin-socket", sock, "--socket", filepath.Join(filepath.Dir(sock), "w.sock"))
	srv.waitFor(t, "msg=serving")
	client := adminClient(t, sock)
	ctx := context.Background()
	before, err := client.GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}

	const clients, killAfter = 8, 300
	var (
		mu       sync.Mutex
		received []string
		killOnce sync.Once
		wg       sync.WaitGroup
	)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	for range clients {
		wg.Go(func() {
			c := adminClient(t, sock)
			// Bounded: each client stops at its first error (the kill) or
			// after far more requests than the kill needs.
			for range 5000 {
				resp, err := c.MintX509SVID(ctx, &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://cluster.local/ns/crash/sa/test", Csr: csr})
				if err != nil {
					return
				}
				mu.Lock()
				received = append(received, resp.GetSerial())
				n := len(received)
				mu.Unlock()
				if n >= killAfter {
					killOnce.Do(func() { srv.signal(t, syscall.SIGKILL) })
				}
			}
		})
	}
	wg.Wait()
	if code := srv.wait(t); code != -1 {
		t.Fatalf("server exit code %d, want killed (-1)", code)
	}
	if len(received) < killAfter {
		t.Fatalf("only %d SVIDs minted before the clients stopped:\n%s", len(received), srv.output())
	}

	// The store opens (the dead process's lock is gone) and is consistent.
	st, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatalf("store does not open after kill -9: %v", err)
	}
	if err := st.Check(); err != nil {
		t.Fatalf("store inconsistent after kill -9: %v", err)
	}
	rows, _, err := st.ListSVIDs(ctx, store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	have := make(map[string]bool, len(rows))
	for _, r := range rows {
		have[r.Serial] = true
	}
	for _, s := range received {
		if !have[s] {
			t.Fatalf("serial %s was handed to a client but is missing from the inventory", s)
		}
	}
	cas, err := st.ListCAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	x509CAs := 0
	for _, c := range cas {
		if c.Kind == "x509" {
			x509CAs++
		}
	}
	if x509CAs != 1 {
		t.Fatalf("%d X.509 CAs after the crash, want 1", x509CAs)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed after %d SVIDs received; inventory holds %d rows", len(received), len(rows))

	// A restarted server serves the same bundle.
	srv2 := startMeshid(t, "server", "--data-dir", dir, "--admin-socket", sock, "--socket", filepath.Join(filepath.Dir(sock), "w.sock"))
	srv2.waitFor(t, "msg=serving")
	after, err := adminClient(t, sock).GetBundle(ctx, &adminv1.GetBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if string(ca.EncodeCertsPEM(before.GetX509Authorities()...)) != string(ca.EncodeCertsPEM(after.GetX509Authorities()...)) {
		t.Fatal("the trust bundle changed across kill -9 and restart")
	}
	srv2.signal(t, syscall.SIGTERM)
	if code := srv2.wait(t); code != 0 {
		t.Fatalf("restarted server exit %d:\n%s", code, srv2.output())
	}
}
