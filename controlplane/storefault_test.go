package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// A data dir whose KEK file went missing must not get a new key: the server
// refuses to start, names the file, and creates nothing.
func TestMissingKEKRefusesToStart(t *testing.T) {
	dir := t.TempDir()
	ts := startServer(t, Config{DataDir: dir})
	ts.stop()
	kekPath := filepath.Join(dir, "kek")
	if err := os.Remove(kekPath); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), Config{DataDir: dir})
	want := fmt.Sprintf("KEK file %s is missing but the store holds sealed CA keys", kekPath)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Open without the KEK file: %v, want %q", err, want)
	}
	if _, err := os.Stat(kekPath); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a KEK file was created for a store with sealed keys: %v", err)
	}
	// The failed Open released the store: trying again gets the same
	// answer, not "in use by another meshid server".
	if _, err := Open(context.Background(), Config{DataDir: dir}); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("second Open: %v", err)
	}
}

// On a full disk a mint is refused with Unavailable (no certificate without
// its inventory row), /readyz goes unready, listing and revocation keep
// working, and once space is freed the server recovers without a restart.
func TestFullDiskRefusesMintsAndRecovers(t *testing.T) {
	dir := t.TempDir()
	// 72 MiB: room for what a server makes at start-up, including, before
	// the WAL was retired, its 64 MiB segment.
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=75497472,mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs to fill (needs root / CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	dataDir := filepath.Join(dir, "data")
	srv, err := Open(context.Background(), Config{DataDir: dataDir})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "meshid-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	socket := filepath.Join(sockDir, "admin.sock")
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: socket, MetricsListen: "127.0.0.1:0"}, func(l Listening) { got <- l })
	}()
	var l Listening
	select {
	case l = <-got:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	// Stops before the unmount cleanup runs (cleanups are LIFO).
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		if err := srv.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := adminv1.NewAdminServiceClient(conn)
	readyz := func() int {
		resp, err := http.Get("http://" + l.MetricsAddr + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	writable := func() string {
		resp, err := http.Get("http://" + l.MetricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "meshid_store_writable "); ok {
				return v
			}
		}
		t.Fatal("no meshid_store_writable series")
		return ""
	}
	if c := readyz(); c != http.StatusOK {
		t.Fatalf("/readyz %d before the disk fills", c)
	}
	if v := writable(); v != "1" {
		t.Fatalf("meshid_store_writable %s before the disk fills, want 1", v)
	}
	csr := csrFor(t)
	const id = "spiffe://cluster.local/ns/disk/sa/full"
	mint := func() (*adminv1.MintX509SVIDResponse, error) {
		return client.MintX509SVID(context.Background(), &adminv1.MintX509SVIDRequest{SpiffeId: id, Csr: csr})
	}
	var minted []string
	for range 20 {
		resp, err := mint()
		if err != nil {
			t.Fatal(err)
		}
		minted = append(minted, resp.GetSerial())
	}

	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	for {
		if _, err := f.Write(buf[:512]); err != nil {
			break
		}
	}
	f.Close()

	// Mints go on in the file's free pages until one needs it to grow.
	refused := false
	for i := 0; i < 20000 && !refused; i++ {
		resp, err := mint()
		switch {
		case err == nil:
			minted = append(minted, resp.GetSerial())
		case status.Code(err) == codes.Unavailable:
			refused = true
		default:
			t.Fatalf("mint on a full disk: %v, want Unavailable", err)
		}
	}
	if !refused {
		t.Fatal("20000 mints succeeded on a full disk")
	}
	if _, err := mint(); status.Code(err) != codes.Unavailable {
		t.Fatalf("mint while the store is unhealthy: %v, want Unavailable", err)
	}
	if _, err := client.CreateEntry(context.Background(), &adminv1.CreateEntryRequest{Entry: &adminv1.Entry{
		SpiffeId: "spiffe://cluster.local/ns/a/sa/b", Selectors: []*adminv1.Selector{{Type: "unix", Value: "uid:7"}},
	}}); status.Code(err) != codes.Unavailable {
		t.Fatalf("create entry on a full disk: %v, want Unavailable", err)
	}
	if c := readyz(); c != http.StatusServiceUnavailable {
		t.Fatalf("/readyz %d on a full disk, want 503", c)
	}
	if v := writable(); v != "0" {
		t.Fatalf("meshid_store_writable %s on a full disk, want 0", v)
	}

	// Every certificate handed out is listed, and nothing else.
	list, err := client.ListCerts(context.Background(), &adminv1.ListCertsRequest{})
	if err != nil {
		t.Fatalf("list certs on a full disk: %v", err)
	}
	if len(list.GetCerts()) != len(minted) {
		t.Fatalf("inventory lists %d certificates, %d were handed out", len(list.GetCerts()), len(minted))
	}
	listed := map[string]bool{}
	for _, c := range list.GetCerts() {
		listed[c.GetSerial()] = true
	}
	for _, s := range minted {
		if !listed[s] {
			t.Fatalf("handed-out certificate %s is not in the inventory", s)
		}
	}
	// Revocation is never refused up front; here it fits in free pages.
	if _, err := client.Revoke(context.Background(), &adminv1.RevokeRequest{Serial: minted[0]}); err != nil {
		t.Fatalf("revoke on a full disk: %v", err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for readyz() != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatal("/readyz still unready 10s after space was freed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if v := writable(); v != "1" {
		t.Fatalf("meshid_store_writable %s after recovery, want 1", v)
	}
	resp, err := mint()
	if err != nil {
		t.Fatalf("mint after space was freed: %v", err)
	}
	rows, _, err := srv.store.ListSVIDs(context.Background(), store.SVIDQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(minted)+1 || !containsSerial(rows, resp.GetSerial()) {
		t.Fatalf("after recovery the inventory has %d rows, want %d including %s", len(rows), len(minted)+1, resp.GetSerial())
	}
}

func containsSerial(rows []store.IssuedSVID, serial string) bool {
	for _, r := range rows {
		if r.Serial == serial {
			return true
		}
	}
	return false
}
