package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The agent listener issues no TLS session tickets: agents do not resume,
// and a resumed session would skip VerifyPeerCertificate (the check that
// refuses a banned agent's chain in the handshake). A client that keeps a
// session cache connects twice and the second handshake is a full one.
func TestAgentListenerNoSessionResumption(t *testing.T) {
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), SVIDTTL: time.Hour, CATTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	dir, err := os.MkdirTemp("", "meshid-agentlisten-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: filepath.Join(dir, "admin.sock"), AgentListen: "127.0.0.1:0"}, func(l Listening) { ready <- l })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	var l Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	pool := x509.NewCertPool()
	for _, c := range srv.BundleCerts() {
		pool.AddCert(c)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13,
		ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	connect := func() tls.ConnectionState {
		t.Helper()
		c, err := tls.Dial("tcp", l.AgentAddr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// A TLS 1.3 ticket comes after the handshake: reading the
		// server's first HTTP/2 frame (its SETTINGS) takes in whatever
		// was sent before it.
		if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 64)); err != nil {
			t.Fatalf("read the server's first frame: %v", err)
		}
		return c.ConnectionState()
	}
	if st := connect(); st.DidResume {
		t.Fatal("the first connection resumed a session")
	}
	if st := connect(); st.DidResume {
		t.Fatal("the second connection resumed the first one's TLS session: the agent listener issues session tickets")
	}
}
