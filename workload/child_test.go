package workload_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// The child is a second workload (another pid, hence another identity): a
// TLS 1.3 mTLS server on 127.0.0.1 whose certificate and trust come from
// its own X509Source, and which accepts only the SPIFFE ID in
// childAuthzEnv. For each accepted connection it writes "hello <peer ID>".
const (
	childEnv      = "MESHID_WL_CHILD"
	childAuthzEnv = "MESHID_WL_CHILD_AUTHZ"
)

type child struct {
	addr  string
	stdin io.WriteCloser
	cmd   *exec.Cmd
}

// startChild runs the child, gives it identity id (an entry for its pid)
// and waits until it listens.
func startChild(t *testing.T, h *harness, id, authorize string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+h.socket, childAuthzEnv+"="+authorize)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{stdin: stdin, cmd: cmd}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		stdin.Close() // the child stops on EOF
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("child: %v", err)
			}
		case <-time.After(waitLong):
			cmd.Process.Kill()
			<-done
			t.Error("child did not stop")
		}
	}
	t.Cleanup(stop)
	h.entry(t, id, pidSelector(cmd.Process.Pid))
	fmt.Fprintln(stdin, "go")
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		lines <- line
		io.Copy(io.Discard, stdout)
	}()
	select {
	case line := <-lines:
		addr, ok := strings.CutPrefix(strings.TrimSpace(line), "addr=")
		if !ok {
			t.Fatalf("child said %q", line)
		}
		c.addr = addr
	case <-time.After(waitLong):
		t.Fatal("child did not start listening")
	}
	return c
}

func childMain() int {
	socket := os.Getenv(childEnv)
	authz, err := spiffeid.FromString(os.Getenv(childAuthzEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitLong)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: x509 source:", err)
		return 2
	}
	defer src.Close()
	cfg := tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeID(authz))
	cfg.MinVersion = tls.VersionTLS13
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: listen:", err)
		return 2
	}
	fmt.Printf("addr=%s\n", lis.Addr())
	go func() {
		io.Copy(io.Discard, in) // until the parent closes stdin
		lis.Close()
	}()
	for {
		conn, err := lis.Accept()
		if err != nil {
			return 0
		}
		go serveChildConn(conn.(*tls.Conn))
	}
}

func serveChildConn(c *tls.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitLong))
	if err := c.Handshake(); err != nil {
		return // refused: the client sees the alert
	}
	peer, err := x509svid.IDFromCert(c.ConnectionState().PeerCertificates[0])
	if err != nil {
		return
	}
	fmt.Fprintf(c, "hello %s\n", peer)
}

// handshake connects to addr over TLS 1.3 mTLS with the caller's SVID from
// src, accepting only a peer authz allows, and returns the peer's leaf and
// the line the peer wrote.
func handshake(ctx context.Context, addr string, src *workloadapi.X509Source, authz tlsconfig.Authorizer) (*x509.Certificate, string, error) {
	cfg := tlsconfig.MTLSClientConfig(src, src, authz)
	cfg.MinVersion = tls.VersionTLS13
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, "", err
	}
	defer conn.Close()
	tc := conn.(*tls.Conn)
	tc.SetDeadline(time.Now().Add(waitLong))
	// TLS 1.3: the server checks the client certificate after the client's
	// handshake is done; a refusal shows up on the first read.
	line, err := bufio.NewReader(tc).ReadString('\n')
	if err != nil {
		return nil, "", err
	}
	st := tc.ConnectionState()
	if st.Version != tls.VersionTLS13 {
		return nil, "", fmt.Errorf("negotiated TLS version %x, want 1.3", st.Version)
	}
	return st.PeerCertificates[0], strings.TrimSpace(line), nil
}
