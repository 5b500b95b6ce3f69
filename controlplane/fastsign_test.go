package controlplane

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestFastSignConfig: Config.FastSign turns fast signing on for the CA made
// on first start and for the CA loaded from the store on the next; without
// it the server signs with x509.CreateCertificate. Either way SVIDs verify.
func TestFastSignConfig(t *testing.T) {
	dir := t.TempDir()
	open := func(fast bool) (*Server, *syncBuffer) {
		t.Helper()
		var logs syncBuffer
		s, err := Open(context.Background(), Config{
			DataDir: dir, FastSign: fast, DisableAutoRotate: true,
			Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		})
		if err != nil {
			t.Fatal(err)
		}
		return s, &logs
	}
	for i, step := range []struct {
		name string
		fast bool
	}{{"first start, fast", true}, {"reload, default", false}, {"reload, fast", true}} {
		s, logs := open(step.fast)
		a, _ := s.activeCA()
		if got := a.FastSignActive(); got != step.fast {
			t.Errorf("%s: FastSignActive = %v, want %v (log: %s)", step.name, got, step.fast, logs)
		}
		if got := strings.Contains(logs.String(), "fast SVID signing enabled"); got != step.fast {
			t.Errorf("%s: enabled logged = %v, want %v", step.name, got, step.fast)
		}
		svid, err := s.MintX509SVID(context.Background(), MintRequest{SpiffeID: "spiffe://cluster.local/ns/a/sa/b", TTL: time.Hour, Requester: "test"})
		if err != nil {
			t.Fatalf("%s: mint: %v", step.name, err)
		}
		leaf, err := x509.ParseCertificate(svid.CertDER)
		if err != nil {
			t.Fatal(err)
		}
		if err := leaf.CheckSignatureFrom(a.Cert); err != nil {
			t.Errorf("%s (%d): SVID signature: %v", step.name, i, err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
