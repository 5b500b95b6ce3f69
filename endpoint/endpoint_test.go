package endpoint

import (
	"bytes"
	"log/slog"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestLayoutFor(t *testing.T) {
	tests := []struct {
		euid       int
		xdg        string
		admin, wls string
	}{
		{0, "/run/user/0", "/run/meshid/admin/admin.sock", "/run/meshid/workload/workload.sock"},
		{1000, "/run/user/1000", "/run/user/1000/meshid/admin/admin.sock", "/run/user/1000/meshid/workload/workload.sock"},
		{1000, "", "/tmp/meshid-1000/admin/admin.sock", "/tmp/meshid-1000/workload/workload.sock"},
		{1000, "relative/dir", "/tmp/meshid-1000/admin/admin.sock", "/tmp/meshid-1000/workload/workload.sock"},
	}
	for _, tt := range tests {
		l := LayoutFor(tt.euid, tt.xdg)
		if l.AdminSocket != tt.admin || l.Socket != tt.wls {
			t.Errorf("LayoutFor(%d, %q) = %s, %s; want %s, %s", tt.euid, tt.xdg, l.AdminSocket, l.Socket, tt.admin, tt.wls)
		}
	}
}

func TestFitCaps(t *testing.T) {
	tests := []struct {
		name         string
		limit, admin int
		caps, want   []int
		scaled       bool
	}{
		{"fits", 20000, 64, []int{8192, 8192}, []int{8192, 8192}, false},
		{"scaled in proportion", 1024 + FDReserve + 64, 64, []int{1024, 1024}, []int{512, 512}, true},
		{"unlimited counts as the whole limit", 1000 + FDReserve + 64, 64, []int{0}, []int{1000}, true},
		{"unknown limit", 0, 64, []int{8192}, []int{8192}, false},
		{"never below one", 10, 64, []int{100, 100}, []int{1, 1}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, scaled := FitCaps(tt.limit, FDReserve, tt.admin, tt.caps)
			if !reflect.DeepEqual(got, tt.want) || scaled != tt.scaled {
				t.Fatalf("FitCaps = %v, %v; want %v, %v", got, scaled, tt.want, tt.scaled)
			}
		})
	}
}

// TestRefusalsLoggedOncePerInterval: a burst of refusals is one log line
// with its count, on a fake clock.
func TestRefusalsLoggedOncePerInterval(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	raw, err := ListenUnix(sock, 0o600, 0o700)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	reg := prometheus.NewRegistry()
	m := NewConnMetrics(reg)
	l := Limit(raw, Limits{Name: "test", Max: 1, LogInterval: time.Minute}, m, slog.New(slog.NewTextHandler(&logs, nil)))
	defer l.Close()
	var now atomic.Int64
	now.Store(1_000_000)
	l.now = func() time.Time { return time.Unix(now.Load(), 0) }

	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept() // returns the first; the rest are refused inside
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	dial := func() net.Conn {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	held := <-accepted
	if held == nil {
		t.Fatal("first connection not accepted")
	}
	defer held.Close()
	refused := func() float64 {
		var d dto.Metric
		_ = m.Refused.WithLabelValues("test", ReasonListenerLimit).Write(&d)
		return d.Counter.GetValue()
	}
	waitRefused := func(n float64) {
		deadline := time.Now().Add(10 * time.Second)
		for refused() < n {
			if time.Now().After(deadline) {
				t.Fatalf("refused %v, want %v", refused(), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// Refusals are accepted by a goroutine of Accept's: keep one running.
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	for range 5 {
		dial()
	}
	waitRefused(5)
	if n := strings.Count(logs.String(), "connections refused"); n != 1 {
		t.Fatalf("%d log lines for a burst within the interval, want 1:\n%s", n, logs.String())
	}
	now.Add(120)
	dial()
	waitRefused(6)
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[1], "refused_listener_limit=5") {
		t.Fatalf("after the interval want one more line counting the 5 since the first:\n%s", logs.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
