package controlplane

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/identity"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value returns the value of the family's sample whose labels include all
// of want.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("metric %s not exported", name)
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range want {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == k && l.GetValue() == v)
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetUntyped() != nil:
			return m.GetUntyped().GetValue()
		}
	}
	t.Fatalf("metric %s has no sample with labels %v", name, want)
	return 0
}

func TestMetricsOverHTTP(t *testing.T) {
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), SVIDTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir, _ := os.MkdirTemp("", "meshid-metrics-")
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: filepath.Join(dir, "a.sock"), MetricsListen: "127.0.0.1:0"}, func(l Listening) { ready <- l })
	}()
	l := <-ready
	defer func() { cancel(); <-done }()
	base := "http://" + l.MetricsAddr

	for _, p := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(base + p)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", p, resp, err)
		}
		resp.Body.Close()
	}

	// Three admin mints and one served workload identity.
	conn := adminClient(t, l.AdminSocket)
	for range 3 {
		if _, err := conn.MintX509SVID(context.Background(), &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://cluster.local/m", Csr: csrFor(t)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.MintX509SVID(context.Background(), &adminv1.MintX509SVIDRequest{SpiffeId: "spiffe://evil/x", Csr: csrFor(t)}); err == nil {
		t.Fatal("foreign mint accepted")
	}
	if _, err := srv.CreateEntry(context.Background(), EntrySpec{SpiffeID: "spiffe://cluster.local/w", Selectors: []store.Selector{{Type: "unix", Value: "uid:5"}}}, "t"); err != nil {
		t.Fatal(err)
	}
	sub, err := srv.Subscribe(context.Background(), identity.Caller{Selectors: []string{"unix:uid:5"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	served := sub.Snapshot().SVIDs[0]

	fams := scrape(t, base+"/metrics")
	if v := value(t, fams, "meshid_svid_issued_total", map[string]string{"kind": "x509"}); v != 4 {
		t.Errorf("issued x509 = %v, want 4 (3 admin + 1 served)", v)
	}
	if v := value(t, fams, "meshid_svid_issue_errors_total", nil); v != 1 {
		t.Errorf("issue errors = %v, want 1", v)
	}
	caNotAfter := srv.BundleCerts()[0].NotAfter.Unix()
	if v := value(t, fams, "meshid_ca_expiry_timestamp_seconds", map[string]string{"kind": "x509", "state": "active"}); int64(v) != caNotAfter {
		t.Errorf("CA expiry = %v, want %d", v, caNotAfter)
	}
	if v := value(t, fams, "meshid_svid_earliest_expiry_timestamp_seconds", nil); int64(v) != served.NotAfter.Unix() {
		t.Errorf("earliest expiry = %v, want %d", v, served.NotAfter.Unix())
	}
	if v := value(t, fams, "meshid_svids_served", nil); v != 1 {
		t.Errorf("served = %v", v)
	}
	if v := value(t, fams, "meshid_svid_renewals_overdue", nil); v != 0 {
		t.Errorf("overdue = %v", v)
	}
	if v := value(t, fams, "meshid_svid_ttl_seconds", nil); v != 3600 {
		t.Errorf("ttl = %v", v)
	}
	if v := value(t, fams, "grpc_server_handled_total", map[string]string{"grpc_method": "MintX509SVID", "grpc_code": "OK"}); v != 3 {
		t.Errorf("grpc handled OK = %v, want 3", v)
	}
	if v := value(t, fams, "grpc_server_handled_total", map[string]string{"grpc_method": "MintX509SVID", "grpc_code": "InvalidArgument"}); v != 1 {
		t.Errorf("grpc handled InvalidArgument = %v, want 1", v)
	}
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "meshid_sds_streams", "meshid_sds_nacks_total", "meshid_renewal_failures_total"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("%s not exported", name)
		}
	}
}

func adminClient(t *testing.T, socket string) adminv1.AdminServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return adminv1.NewAdminServiceClient(conn)
}
