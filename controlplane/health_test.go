package controlplane

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

// listServices asks the server reflection service what it serves.
func listServices(ctx context.Context, conn *grpc.ClientConn) ([]string, error) {
	st, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	defer st.CloseSend()
	// A Send to a stream the server already ended (Unimplemented, on a
	// socket without reflection) returns io.EOF; the status is what Recv
	// then returns.
	if err := st.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: "*"}}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	resp, err := st.Recv()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		out = append(out, s.GetName())
	}
	return out, nil
}

// TestHealthPerServiceAndReflection: a probe that names the service it
// depends on gets SERVING for each served one (not NOT_FOUND), and
// NOT_SERVING once the server drains; reflection answers on the admin
// socket and nowhere else.
func TestHealthPerServiceAndReflection(t *testing.T) {
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), CATTL: 24 * time.Hour, SVIDTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir, err := os.MkdirTemp("", "meshid-health-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ep := Endpoints{AdminSocket: filepath.Join(dir, "a.sock"), Socket: filepath.Join(dir, "w.sock"), DrainTimeout: time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, ep, func(Listening) { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	admin, wl := dialUnix(t, ep.AdminSocket), dialUnix(t, ep.Socket)
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()

	names, err := listServices(rctx, admin)
	if err != nil {
		t.Fatalf("reflection on the admin socket: %v", err)
	}
	want := map[string]bool{"meshid.admin.v1.AdminService": false, "grpc.health.v1.Health": false}
	for _, n := range names {
		if _, ok := want[n]; ok {
			want[n] = true
		}
	}
	for n, seen := range want {
		if !seen {
			t.Errorf("reflection does not list %s (got %v)", n, names)
		}
	}
	if _, err := listServices(rctx, wl); status.Code(err) != codes.Unimplemented {
		t.Errorf("reflection on the workload socket: %v, want Unimplemented", err)
	}

	for conn, services := range map[*grpc.ClientConn][]string{
		admin: {"", "meshid.admin.v1.AdminService"},
		wl:    {"", "envoy.service.secret.v3.SecretDiscoveryService", "SpiffeWorkloadAPI"},
	} {
		for _, name := range services {
			resp, err := healthpb.NewHealthClient(conn).Check(rctx, &healthpb.HealthCheckRequest{Service: name})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health of %q: %v %v, want SERVING", name, resp.GetStatus(), err)
			}
		}
	}

	// Each listener speaks only for what it serves.
	for conn, name := range map[*grpc.ClientConn]string{admin: "SpiffeWorkloadAPI", wl: "meshid.admin.v1.AdminService"} {
		if _, err := healthpb.NewHealthClient(conn).Check(rctx, &healthpb.HealthCheckRequest{Service: name}); status.Code(err) != codes.NotFound {
			t.Errorf("health of %q on a listener that does not serve it: %v, want NotFound", name, err)
		}
	}

	watch, err := healthpb.NewHealthClient(wl).Watch(rctx, &healthpb.HealthCheckRequest{Service: "SpiffeWorkloadAPI"})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", r.GetStatus(), err)
	}
	cancel()
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("on drain the watch got %v %v, want NOT_SERVING", r.GetStatus(), err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestBuildInfoMetric(t *testing.T) {
	m := NewMetrics()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "meshid_build_info" {
			continue
		}
		labels := map[string]string{}
		for _, l := range f.GetMetric()[0].GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["goversion"] != runtime.Version() || labels["version"] != BuildVersion() || labels["revision"] == "" ||
			f.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Fatalf("meshid_build_info = %v %v", labels, f.GetMetric()[0].GetGauge().GetValue())
		}
		return
	}
	t.Fatal("no meshid_build_info")
}
