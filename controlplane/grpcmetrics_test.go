package controlplane

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// sample returns the first sample of the family whose labels include all
// of want, or nil.
func sample(fams map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
next:
	for _, m := range fams[name].GetMetric() {
		for k, v := range want {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == k && l.GetValue() == v)
			}
			if !found {
				continue next
			}
		}
		return m
	}
	return nil
}

// TestGRPCMetricsCoverStreams fetches an SVID over the Workload API (a
// server stream) and checks that the stream has what go-grpc-middleware's
// dashboards chart: a handled count, a handling-time histogram and message
// counters. The hand-written interceptors before had neither for streams.
func TestGRPCMetricsCoverStreams(t *testing.T) {
	srv := openServer(t)
	const id = "spiffe://cluster.local/ns/default/sa/metrics"
	entryFor(t, srv, id, fmt.Sprintf("unix:uid:%d", os.Getuid()))
	dir := shortTemp(t)
	l := runEndpoints(t, srv, Endpoints{
		AdminSocket:   filepath.Join(dir, "admin", "a.sock"),
		Socket:        filepath.Join(dir, "workload", "w.sock"),
		MetricsListen: "127.0.0.1:0",
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+l.Socket))
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID.String() != id {
		t.Fatalf("got %s, want %s", svid.ID, id)
	}

	stream := map[string]string{"grpc_service": "SpiffeWorkloadAPI", "grpc_method": "FetchX509SVID", "grpc_type": "server_stream"}
	// The client has gone; the server's handler returns when it notices, so
	// poll for the handled count rather than expect it at once.
	var fams map[string]*dto.MetricFamily
	for deadline := time.Now().Add(20 * time.Second); ; {
		fams = scrape(t, "http://"+l.MetricsAddr+"/metrics")
		if m := sample(fams, "grpc_server_handled_total", stream); m != nil && m.GetCounter().GetValue() >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Workload API stream was never counted as handled")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if m := sample(fams, "grpc_server_started_total", stream); m.GetCounter().GetValue() != 1 {
		t.Errorf("started = %v, want 1", m)
	}
	if m := sample(fams, "grpc_server_msg_sent_total", stream); m == nil || m.GetCounter().GetValue() < 1 {
		t.Errorf("msg sent = %v, want >= 1", m)
	}
	if m := sample(fams, "grpc_server_msg_received_total", stream); m == nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("msg received = %v, want 1 (the request)", m)
	}
	if m := sample(fams, "grpc_server_handling_seconds", stream); m == nil || m.GetHistogram().GetSampleCount() != 1 {
		t.Errorf("handling histogram = %v, want one sample for the stream", m)
	}
}
