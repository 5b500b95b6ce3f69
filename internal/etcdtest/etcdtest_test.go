package etcdtest

import (
	"context"
	"net/http"
	"os"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// TestStopRestart brings a 3-member cluster up, stops two members (the
// survivor then has no quorum and /health says so) and restarts them on the
// same data dirs and ports.
func TestStopRestart(t *testing.T) {
	c := Start(t, 3)
	if len(c.Endpoints()) != 3 {
		t.Fatalf("endpoints %v", c.Endpoints())
	}
	c.Stop(t, 1)
	c.Kill(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err == nil {
		t.Fatal("one member of three reports healthy")
	}
	c.Restart(t, 1)
	c.Restart(t, 2)
	ctx, cancel = context.WithTimeout(context.Background(), ReadyTimeout)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestTLS checks that a TLS cluster refuses a client without a certificate
// and serves one with the cluster's client certificate.
func TestTLS(t *testing.T) {
	c := Start(t, 1, Options{TLS: true, UnsafeNoFsync: true})
	noCert := &http.Client{Transport: &http.Transport{TLSClientConfig: c.ClientTLS().Clone()}}
	noCert.Transport.(*http.Transport).TLSClientConfig.Certificates = nil
	if resp, err := noCert.Get(c.Endpoint(0) + "/health"); err == nil {
		resp.Body.Close()
		t.Fatalf("no client cert: %s, want a handshake failure", resp.Status)
	}
	withCert := &http.Client{Transport: &http.Transport{TLSClientConfig: c.ClientTLS()}}
	if err := probe(context.Background(), withCert, c.Endpoint(0)+"/health"); err != nil {
		t.Fatal(err)
	}
}

func TestShared(t *testing.T) {
	e1, p1 := Shared(t)
	e2, p2 := Shared(t)
	if len(e1) != 1 || e1[0] != e2[0] || p1 == p2 {
		t.Fatalf("Shared: %v %q, %v %q", e1, p1, e2, p2)
	}
}
