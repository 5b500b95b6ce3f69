package sds_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/sds"
)

// idChurn is the ID whose certificates the big-bundle test revokes one at
// a time, each revocation a new CRL, hence a push to every bundle stream.
const idChurn = "spiffe://cluster.local/ns/shop/sa/batch"

// growCRL mints n certificates for idB and revokes them together, so every
// bundle from then on carries a CRL listing n serials.
func growCRL(t *testing.T, h *harness, n int) {
	t.Helper()
	const workers = 8 // the store commits concurrent mints together
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for range n / workers {
				if _, err := h.srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: idB, Requester: "test"}); err != nil {
					errc <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Revoke(context.Background(), idB, "", "test"); err != nil {
		t.Fatal(err)
	}
}

// revokeOne changes every bundle: one more serial on the CRL.
func revokeOne(t *testing.T, h *harness) {
	t.Helper()
	svid, err := h.srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: idChurn, Requester: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Revoke(context.Background(), "", svid.Serial, "test"); err != nil {
		t.Fatal(err)
	}
}

func metricValue(t *testing.T, srv *controlplane.Server, name string) float64 {
	t.Helper()
	fams, err := srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			m := f.GetMetric()[0]
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("%s not found", name)
	return 0
}

// waitMetric polls a metric until cond holds; the deadline only bounds a
// broken run.
func waitMetric(t *testing.T, srv *controlplane.Server, name string, cond func(float64) bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		v := metricValue(t, srv, name)
		if cond(v) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s stuck at %v", name, v)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// silentClient is a connection whose streams are never read. Its windows
// are the smallest a gRPC client may announce (64 KiB), fixed: with an
// explicit window grpc-go does not grow it from its bandwidth estimate.
func silentClient(t *testing.T, socket string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

// TestBigBundleDoesNotStallPushers: with a bundle bigger than gRPC's
// per-stream write quota (64 KiB, here a CRL of some 1700 serials), the
// third unanswered response to a client that does not read waits until it
// reads. More such streams than there are pushers must not keep a
// well-behaved stream from its pushes: the waiting Sends are the silent
// streams' own. Both stream kinds.
func TestBigBundleDoesNotStallPushers(t *testing.T) {
	const drain = time.Second
	h := startServerDrain(t, time.Hour, drain)
	growCRL(t, h, 1704)

	type reader struct {
		// next is the next response's size, within a prompt bound; it
		// answers (ACKs) the response.
		next func(t *testing.T) int
	}
	kinds := []struct {
		name   string
		silent func(ctx context.Context, c secretv3.SecretDiscoveryServiceClient) error
		reader func(t *testing.T) reader
	}{
		{"sotw", func(ctx context.Context, c secretv3.SecretDiscoveryServiceClient) error {
			st, err := c.StreamSecrets(ctx)
			if err != nil {
				return err
			}
			return st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("silent"), ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL})
		}, func(t *testing.T) reader {
			s := openSotW(t, dialSDS(t, h.socket), "reader", "ROOTCA")
			return reader{func(t *testing.T) int {
				t.Helper()
				select {
				case r := <-s.resps:
					s.ack(r)
					return proto.Size(r)
				case err := <-s.errs:
					t.Fatalf("reader's stream ended: %v", err)
				case <-time.After(10 * time.Second):
					t.Fatal("the reader got no push within 10s: the pushers are stalled")
				}
				return 0
			}}
		}},
		{"delta", func(ctx context.Context, c secretv3.SecretDiscoveryServiceClient) error {
			st, err := c.DeltaSecrets(ctx)
			if err != nil {
				return err
			}
			return st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("silent"), ResourceNamesSubscribe: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL})
		}, func(t *testing.T) reader {
			d := openDelta(t, h, &discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"ROOTCA"}})
			return reader{func(t *testing.T) int {
				t.Helper()
				select {
				case r := <-d.resps:
					d.ack(r)
					return proto.Size(r)
				case err := <-d.errs:
					t.Fatalf("reader's stream ended: %v", err)
				case <-time.After(10 * time.Second):
					t.Fatal("the reader got no push within 10s: the pushers are stalled")
				}
				return 0
			}}
		}},
	}
	for _, kind := range kinds {
		t.Run(kind.name, func(t *testing.T) {
			streams0 := metricValue(t, h.srv, "meshid_sds_streams")
			p0 := metricValue(t, h.srv, "meshid_sds_pushes_total")
			c := silentClient(t, h.socket)
			ctx, cancel := context.WithCancel(context.Background())
			defer func() {
				// Reset by the client: a Send waiting on it returns, and
				// its streams end.
				cancel()
				waitMetric(t, h.srv, "meshid_sds_streams", func(v float64) bool { return v <= streams0+1 })
			}()
			silent := sds.Pushers() + 2
			for range silent {
				if err := kind.silent(ctx, c); err != nil {
					t.Fatal(err)
				}
			}
			r := kind.reader(t)
			if n := r.next(t); n <= 64<<10 {
				t.Fatalf("the bundle response is %d bytes; the test needs more than 64 KiB", n)
			}
			// Every stream has its first response (the silent ones only
			// in their client's buffers): what follows are pushes.
			want := p0 + float64(silent) + 1
			waitMetric(t, h.srv, "meshid_sds_pushes_total", func(v float64) bool { return v >= want })
			revokeOne(t, h)
			r.next(t)
			want += float64(silent) + 1
			waitMetric(t, h.srv, "meshid_sds_pushes_total", func(v float64) bool { return v >= want })
			// The silent streams' third responses find their write quota
			// used up, and wait for clients that never read: on the
			// pushers, that would be every pusher (more silent streams
			// than pushers, each queued before the reader's next push).
			revokeOne(t, h)
			r.next(t)
			revokeOne(t, h)
			r.next(t)
			// They do wait, each on its stream's own goroutine.
			waitMetric(t, h.srv, "meshid_sds_large_sends_in_flight", func(v float64) bool { return v == float64(silent) })
		})
	}

	// A Send waiting on a client that does not read is the stream's: the
	// server's stop waits for it until the drain deadline closes the
	// connection, then returns, and the goroutine is gone (goleak, in
	// TestMain).
	t.Run("stop", func(t *testing.T) {
		p0 := metricValue(t, h.srv, "meshid_sds_pushes_total")
		c := silentClient(t, h.socket)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		st, err := c.StreamSecrets(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("silent"), ResourceNames: []string{"ROOTCA"}, TypeUrl: sds.SecretTypeURL}); err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			waitMetric(t, h.srv, "meshid_sds_pushes_total", func(v float64) bool { return v >= p0+float64(i)+1 })
			revokeOne(t, h)
		}
		waitMetric(t, h.srv, "meshid_sds_large_sends_in_flight", func(v float64) bool { return v == 1 })
		stopped := make(chan struct{})
		go func() { h.stop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(drain + 30*time.Second):
			t.Fatal("the server did not stop: a Send waiting on a client outlived the drain")
		}
		if v := metricValue(t, h.srv, "meshid_sds_large_sends_in_flight"); v != 0 {
			t.Fatalf("%v large sends still in flight after the server stopped", v)
		}
	})
}
