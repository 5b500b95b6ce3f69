package k8stest

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestTrackClosesATestsOwnTransport: an idle connection of a client a
// test made itself is closed by CloseIdle (what FindLeaks calls, again and
// again) only if its transport was Track'ed. Before Track, pcrsigner's
// per-test client kept one open, with its read goroutine, when its last
// watch ended after the test's cleanup, and goleak failed the binary in CI.
func TestTrackClosesATestsOwnTransport(t *testing.T) {
	closed := make(chan struct{}, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") }))
	srv.EnableHTTP2 = true
	// The server sees the client close the connection: nothing else here
	// closes it before srv.Close.
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			select {
			case closed <- struct{}{}:
			default:
			}
		}
	}
	srv.StartTLS()
	defer srv.Close()
	hc := srv.Client()
	resp, err := hc.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("the test server spoke HTTP/%d, want 2", resp.ProtoMajor)
	}
	CloseIdle()
	select {
	case <-closed:
		t.Fatal("CloseIdle closed a transport nobody tracked: the test shows nothing")
	case <-time.After(200 * time.Millisecond): // a bound on a negative, not a synchronisation
	}
	Track(t, hc.Transport)
	CloseIdle()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the tracked transport's idle connection is still open after CloseIdle")
	}
}
