package sds_test

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/sds"
)

// liveSource serves every caller one snapshot, replaced by set.
type liveSource struct {
	mu   sync.Mutex
	snap *identity.Snapshot
	subs map[*liveSub]struct{}
}

type liveSub struct {
	src *liveSource
	ch  chan struct{}
}

func (s *liveSub) Snapshot() *identity.Snapshot {
	s.src.mu.Lock()
	defer s.src.mu.Unlock()
	return s.src.snap
}
func (s *liveSub) Changed() <-chan struct{} { return s.ch }
func (s *liveSub) Close() {
	s.src.mu.Lock()
	defer s.src.mu.Unlock()
	delete(s.src.subs, s)
}

func (s *liveSource) Subscribe(context.Context, identity.Caller) (identity.Subscription, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sub := &liveSub{src: s, ch: make(chan struct{}, 1)}
	s.subs[sub] = struct{}{}
	return sub, nil
}

// setBundle publishes the trust domain's bundle at version v.
func (s *liveSource) setBundle(v string) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap = &identity.Snapshot{Bundles: []*identity.Bundle{{TrustDomain: td, PEM: []byte("pem " + v), Version: v}}}
	for sub := range s.subs {
		select {
		case sub.ch <- struct{}{}:
		default:
		}
	}
}

// startVersionServer serves SDS from src on a real unix socket.
func startVersionServer(t *testing.T, src *liveSource) (*sds.Server, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "meshid-sdsv-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "s.sock")
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := sds.New(src, func(context.Context) (identity.Caller, error) { return identity.Caller{Label: "test"}, nil }, nil, nil)
	g := grpc.NewServer()
	srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(func() {
		srv.Shutdown()
		g.Stop()
		os.RemoveAll(dir)
	})
	return srv, socket
}

// waitVersions polls BundleVersions until it is want.
func waitVersions(t *testing.T, srv *sds.Server, want map[string]int) {
	t.Helper()
	waitServer(t, func() (bool, string) {
		got := srv.BundleVersions()
		return maps.Equal(got, want), fmt.Sprintf("BundleVersions = %v, want %v", got, want)
	})
}

// waitServer polls cond, which the server's goroutines make true, for up
// to 10 s; on time-out it fails with cond's description.
func waitServer(t *testing.T, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok, what := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A stream counts under the bundle version it ACKed: not the one it was
// sent, and not the one it NACKed; a stream asking only for its SVID does
// not count; a closed stream stops counting. SotW and Delta alike.
func TestBundleVersionsCountACKedBundle(t *testing.T) {
	src := &liveSource{subs: map[*liveSub]struct{}{}}
	src.setBundle("v1")
	srv, socket := startVersionServer(t, src)
	c := dialSDS(t, socket)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	ack := func(st grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse], names []string, r *discoveryv3.DiscoveryResponse, nack bool) {
		t.Helper()
		req := &discoveryv3.DiscoveryRequest{ResourceNames: names, TypeUrl: sds.SecretTypeURL, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}
		if nack {
			req.ErrorDetail = &statuspb.Status{Code: 3, Message: "rejected"}
		}
		if err := st.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	open := func(names ...string) (grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse], context.CancelFunc) {
		t.Helper()
		sctx, scancel := context.WithCancel(ctx)
		st, err := c.StreamSecrets(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode("n"), ResourceNames: names, TypeUrl: sds.SecretTypeURL}); err != nil {
			t.Fatal(err)
		}
		return st, scancel
	}
	recv := func(st interface {
		Recv() (*discoveryv3.DiscoveryResponse, error)
	}) *discoveryv3.DiscoveryResponse {
		t.Helper()
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}

	// good ACKs everything; bad NACKs the second bundle; slow never
	// answers it; all asks for a name only present as a SPIFFE ID.
	good, _ := open("ROOTCA")
	bad, _ := open("ALL")
	slow, cancelSlow := open("spiffe://cluster.local")
	// A name the caller holds nothing for: never counted.
	_, _ = open("default")
	r1 := map[string]*discoveryv3.DiscoveryResponse{}
	for name, st := range map[string]grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]{"ROOTCA": good, "ALL": bad, "spiffe://cluster.local": slow} {
		r1[name] = recv(st)
	}
	// Sent but not ACKed yet: none of them holds v1.
	waitVersions(t, srv, map[string]int{"": 3})
	ack(good, []string{"ROOTCA"}, r1["ROOTCA"], false)
	ack(bad, []string{"ALL"}, r1["ALL"], false)
	ack(slow, []string{"spiffe://cluster.local"}, r1["spiffe://cluster.local"], false)
	waitVersions(t, srv, map[string]int{"v1": 3})

	src.setBundle("v2")
	r2good, r2bad := recv(good), recv(bad)
	_ = recv(slow) // received, never answered
	ack(good, []string{"ROOTCA"}, r2good, false)
	ack(bad, []string{"ALL"}, r2bad, true)
	waitVersions(t, srv, map[string]int{"v2": 1, "v1": 2})
	// The versions are already right before the NACK is handled (bad
	// stays on v1 either way): wait for the count itself.
	waitServer(t, func() (bool, string) {
		n := sds.NACKCount(srv)
		return n == 1, fmt.Sprintf("NACKs = %v, want 1", n)
	})

	cancelSlow()
	waitVersions(t, srv, map[string]int{"v2": 1, "v1": 1})

	// Delta: counted on ACK of the response that carried the bundle; a
	// later NACK of another change does not undo it, a NACK of the bundle
	// does.
	dctx, dcancel := context.WithCancel(ctx)
	defer dcancel()
	ds, err := c.DeltaSecrets(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ds.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode("d"), TypeUrl: sds.SecretTypeURL, ResourceNamesSubscribe: []string{"ROOTCA"}}); err != nil {
		t.Fatal(err)
	}
	d1, err := ds.Recv()
	if err != nil {
		t.Fatal(err)
	}
	waitVersions(t, srv, map[string]int{"v2": 1, "v1": 1, "": 1})
	if err := ds.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResponseNonce: d1.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	waitVersions(t, srv, map[string]int{"v2": 2, "v1": 1})
	src.setBundle("v3")
	d2, err := ds.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = recv(good)
	_ = recv(bad)
	if err := ds.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResponseNonce: d2.GetNonce(), ErrorDetail: &statuspb.Status{Code: 3, Message: "no"}}); err != nil {
		t.Fatal(err)
	}
	// Wait until the NACK is read, then check the delta stream stayed on v2.
	waitServer(t, func() (bool, string) { return sds.NACKCount(srv) == 2, "delta NACK not read" })
	waitVersions(t, srv, map[string]int{"v2": 2, "v1": 1})
}
