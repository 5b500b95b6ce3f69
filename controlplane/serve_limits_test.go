package controlplane

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"

	"github.com/meshid/meshid/endpoint"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

const waitLimit = 20 * time.Second

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func fetchID(ctx context.Context, socket string) (string, error) {
	s, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		return "", err
	}
	return s.ID.String(), nil
}

func metricValue(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	if d.Gauge != nil {
		return d.Gauge.GetValue()
	}
	return d.Counter.GetValue()
}

func (s *Server) connGauge(listener string) float64 {
	return metricValue(s.metrics.Conns.Open.WithLabelValues(listener))
}

func (s *Server) refusedCount(listener, reason string) float64 {
	return metricValue(s.metrics.Conns.Refused.WithLabelValues(listener, reason))
}

func limitLayout(t *testing.T) (admin, socket string) {
	lay := filepath.Join(shortTemp(t), "meshid")
	return filepath.Join(lay, "admin", "admin.sock"), filepath.Join(lay, "workload", "workload.sock")
}

// TestConnectionFloodLeavesAdminAndExistingWorkloads: another process fills
// the workload socket's cap; the admin API and a workload connected before
// still answer, new workload connections are refused and counted, and the
// slots come back when the flood ends.
func TestConnectionFloodLeavesAdminAndExistingWorkloads(t *testing.T) {
	bin := binaryFor(t)
	srv := openServer(t)
	const id = "spiffe://cluster.local/ns/default/sa/root"
	entryFor(t, srv, id, "unix:uid:0")
	admin, socket := limitLayout(t)
	const limit = 50
	l := runEndpoints(t, srv, Endpoints{
		AdminSocket: admin, Socket: socket,
		MaxConnections: limit, MaxConnectionsPerUID: -1, HandshakeTimeout: time.Minute,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitLimit)
	defer cancel()
	existing, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	defer existing.Close()
	if _, err := existing.FetchX509SVID(ctx); err != nil {
		t.Fatal(err)
	}
	const flood = 80
	stop := startFlood(t, bin, l.Socket, flood)
	waitFor(t, "the flood to fill the cap", func() bool {
		return srv.connGauge("workload") == limit && srv.refusedCount("workload", endpoint.ReasonListenerLimit) >= flood-(limit-1)
	})

	if _, err := adminClient(t, l.AdminSocket).ListEntries(ctx, &adminv1.ListEntriesRequest{}); err != nil {
		t.Fatalf("admin API during the flood: %v", err)
	}
	if got, err := existing.FetchX509SVID(ctx); err != nil || got.ID.String() != id {
		t.Fatalf("existing workload during the flood: %v %v", got, err)
	}
	before := srv.refusedCount("workload", endpoint.ReasonListenerLimit)
	short, cancelShort := context.WithTimeout(ctx, 2*time.Second)
	if _, err := fetchID(short, l.Socket); err == nil {
		t.Fatal("a new workload connection beyond the cap was served")
	}
	cancelShort()
	if after := srv.refusedCount("workload", endpoint.ReasonListenerLimit); after <= before {
		t.Fatalf("refusal not counted: %v -> %v", before, after)
	}

	stop()
	waitFor(t, "the flood's slots to come back", func() bool { return srv.connGauge("workload") <= 1 })
	if got, err := fetchID(ctx, l.Socket); err != nil || got != id {
		t.Fatalf("new workload after the flood: %q %v", got, err)
	}
}

// TestPerUIDConnectionCap: one uid cannot take more than its share; another
// uid still connects.
func TestPerUIDConnectionCap(t *testing.T) {
	bin := binaryFor(t)
	srv := openServer(t)
	const id = "spiffe://cluster.local/ns/default/sa/root"
	entryFor(t, srv, id, "unix:uid:0")
	admin, socket := limitLayout(t)
	const perUID, flood = 5, 20
	l := runEndpoints(t, srv, Endpoints{AdminSocket: admin, Socket: socket, MaxConnectionsPerUID: perUID, HandshakeTimeout: time.Minute})
	startFlood(t, bin, l.Socket, flood)
	waitFor(t, "uid 65534 to reach its cap", func() bool {
		return srv.connGauge("workload") == perUID && srv.refusedCount("workload", endpoint.ReasonUIDLimit) == flood-perUID
	})
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if got, err := fetchID(ctx, l.Socket); err != nil || got != id {
		t.Fatalf("root during uid 65534's flood: %q %v", got, err)
	}
}

func remoteServer(t *testing.T, ep Endpoints) Listening {
	t.Helper()
	srv := openServer(t)
	ep.AdminSocket = filepath.Join(shortTemp(t), "admin.sock")
	return runEndpoints(t, srv, ep)
}

// closedByServer reads from c until the server closes it; a read that
// times out means the server kept the connection.
func closedByServer(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(within)); err != nil {
		t.Fatal(err)
	}
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("server still holds the connection after %s", within)
	}
}

func TestSDSListenHandshakeTimeout(t *testing.T) {
	l := remoteServer(t, Endpoints{SDSListen: "127.0.0.1:0", HandshakeTimeout: 300 * time.Millisecond})
	c, err := net.Dial("tcp", l.SDSAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	closedByServer(t, c, 10*time.Second) // the default was 120 s
}

func TestSDSListenClosesConnectionWithoutStream(t *testing.T) {
	l := remoteServer(t, Endpoints{SDSListen: "127.0.0.1:0", IdleTimeout: 300 * time.Millisecond})
	conn, err := grpc.NewClient(l.SDSAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Connect()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
		if !conn.WaitForStateChange(ctx, s) {
			t.Fatalf("never connected: %v", s)
		}
	}
	if !conn.WaitForStateChange(ctx, connectivity.Ready) {
		t.Fatal("a connection without a stream was kept for 10 s")
	}
}

func TestRESTSDSDropsSlowBody(t *testing.T) {
	l := remoteServer(t, Endpoints{SDSRESTListen: "127.0.0.1:0", RESTReadTimeout: 500 * time.Millisecond})
	c, err := tls.Dial("tcp", l.SDSRESTAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Complete headers, then a body that never finishes.
	if _, err := io.WriteString(c, "POST /v3/discovery:secrets HTTP/1.1\r\nHost: meshid\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n{"); err != nil {
		t.Fatal(err)
	}
	closedByServer(t, c, 10*time.Second)
}
