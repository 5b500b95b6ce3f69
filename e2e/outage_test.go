package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/protobuf/encoding/protojson"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
)

// An mTLS workload child: this test binary as another uid, holding an
// X509Source on its agent's socket and doing a handshake with its peer
// every 150 ms, one side listening on loopback, the other dialing. Its
// own env variable, not wlModeEnv: agents_test.go's init exits on modes it
// does not know.
const (
	mtlsModeEnv = "MESHID_E2E_MTLS"      // listen, dial or serial
	mtlsPeerEnv = "MESHID_E2E_MTLS_PEER" // the peer's SPIFFE ID
	mtlsAddrEnv = "MESHID_E2E_MTLS_ADDR" // dial: the listener's address
)

// What an mTLS child prints, a line each:
//
//	addr=HOST:PORT            the listener's address (listen, first)
//	peer serial=S             a handshake met a peer leaf not seen before
//	fail ERR                  a handshake (or the byte after it) failed
//	expired serial=S          the peer presented a leaf past its NotAfter
//	count ok=N fail=M         every second, and once more at the end
//	serial=S id=ID            serial mode: the SVID fetched, then exit
func init() {
	mode := os.Getenv(mtlsModeEnv)
	if mode == "" {
		return
	}
	os.Exit(mtlsChild(mode))
}

func mtlsChild(mode string) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr := workloadapi.WithAddr("unix://" + os.Getenv(wlSockEnv))
	if mode == "serial" {
		fctx, fcancel := context.WithTimeout(ctx, 20*time.Second)
		defer fcancel()
		svid, err := workloadapi.FetchX509SVID(fctx, addr)
		if err != nil {
			fmt.Println("fail", err)
			return 1
		}
		fmt.Printf("serial=%s id=%s\n", svid.Certificates[0].SerialNumber.Text(16), svid.ID)
		return 0
	}
	peer, err := spiffeid.FromString(os.Getenv(mtlsPeerEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer:", err)
		return 2
	}
	go func() { // the parent ends the child by closing stdin
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(addr))
	if err != nil {
		fmt.Fprintln(os.Stderr, "x509 source:", err)
		return 1
	}
	defer src.Close()

	var out sync.Mutex
	say := func(format string, args ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	var ok, failed atomic.Int64
	var seenMu sync.Mutex
	seen := map[string]bool{}
	// Each side checks the leaf it is shown itself, beyond go-spiffe's
	// chain verification: an expired SVID must never be presented.
	check := func(cs tls.ConnectionState) error {
		leaf := cs.PeerCertificates[0]
		serial := leaf.SerialNumber.Text(16)
		if !time.Now().Before(leaf.NotAfter) {
			say("expired serial=%s", serial)
			return fmt.Errorf("peer leaf %s expired at %s", serial, leaf.NotAfter)
		}
		seenMu.Lock()
		isNew := !seen[serial]
		seen[serial] = true
		seenMu.Unlock()
		if isNew {
			say("peer serial=%s", serial)
		}
		return nil
	}
	fail := func(err error) {
		if ctx.Err() != nil {
			return // stopping: not the peer's fault
		}
		failed.Add(1)
		say("fail %v", err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				say("count ok=%d fail=%d", ok.Load(), failed.Load())
			}
		}
	})
	authz := tlsconfig.AuthorizeID(peer)
	switch mode {
	case "listen":
		cfg := tlsconfig.MTLSServerConfig(src, src, authz)
		cfg.VerifyConnection = check
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, "listen:", err)
			return 1
		}
		say("addr=%s", l.Addr())
		wg.Go(func() { <-ctx.Done(); l.Close() })
		for {
			c, err := l.Accept()
			if err != nil {
				break
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				tc := tls.Server(c, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					fail(fmt.Errorf("handshake: %w", err))
					return
				}
				if _, err := tc.Write([]byte{'x'}); err != nil {
					fail(fmt.Errorf("write: %w", err))
					return
				}
				ok.Add(1)
			})
		}
	case "dial":
		cfg := tlsconfig.MTLSClientConfig(src, src, authz)
		cfg.VerifyConnection = check
		target := os.Getenv(mtlsAddrEnv)
		t := time.NewTicker(150 * time.Millisecond)
		defer t.Stop()
		for ctx.Err() == nil {
			func() {
				d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
				// Not ctx: stopping finishes the handshake in flight, which
				// the listener would otherwise count as failed.
				dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer dcancel()
				c, err := d.DialContext(dctx, "tcp", target)
				if err != nil {
					fail(fmt.Errorf("dial: %w", err))
					return
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					fail(fmt.Errorf("read: %w", err))
					return
				}
				ok.Add(1)
			}()
			select {
			case <-ctx.Done():
			case <-t.C:
			}
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown mtls mode", mode)
		return 2
	}
	cancel()
	wg.Wait()
	say("count ok=%d fail=%d", ok.Load(), failed.Load())
	return 0
}

// mtlsPeer is a running mTLS child as the parent sees it.
type mtlsPeer struct {
	name  string
	stdin io.Closer
	addr  chan string
	done  chan struct{}

	mu        sync.Mutex
	serials   []peerSerial // each peer leaf the first time it was met
	fails     []string
	expired   []string
	ok, nfail int64
}

type peerSerial struct {
	serial string
	at     time.Time
}

func startMTLS(t *testing.T, bin string, uid int, mode, socket, peer, target string) *mtlsPeer {
	t.Helper()
	cmd := workloadCmd(bin, uid, "", socket)
	cmd.Env = append(cmd.Env, mtlsModeEnv+"="+mode, mtlsPeerEnv+"="+peer, mtlsAddrEnv+"="+target)
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
	p := &mtlsPeer{name: fmt.Sprintf("%s (uid %d)", mode, uid), stdin: stdin, addr: make(chan string, 1), done: make(chan struct{})}
	count := regexp.MustCompile(`^count ok=(\d+) fail=(\d+)$`)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			l := sc.Text()
			p.mu.Lock()
			switch {
			case strings.HasPrefix(l, "addr="):
				p.addr <- strings.TrimPrefix(l, "addr=")
			case strings.HasPrefix(l, "peer serial="):
				p.serials = append(p.serials, peerSerial{strings.TrimPrefix(l, "peer serial="), time.Now()})
			case strings.HasPrefix(l, "fail "):
				p.fails = append(p.fails, time.Now().Format(time.TimeOnly)+" "+l)
			case strings.HasPrefix(l, "expired "):
				p.expired = append(p.expired, l)
			default:
				if m := count.FindStringSubmatch(l); m != nil {
					p.ok, _ = strconv.ParseInt(m[1], 10, 64)
					p.nfail, _ = strconv.ParseInt(m[2], 10, 64)
				}
			}
			p.mu.Unlock()
		}
		_ = cmd.Wait()
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop ends the child and waits for its last count.
func (p *mtlsPeer) stop(t *testing.T) {
	t.Helper()
	p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Errorf("%s did not stop", p.name)
	}
}

func (p *mtlsPeer) okCount() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ok
}

// newSerialSince is the first peer leaf met after since, if any.
func (p *mtlsPeer) newSerialSince(since time.Time) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.serials {
		if s.at.After(since) {
			return s.serial, true
		}
	}
	return "", false
}

// lastSerial is the peer leaf met last.
func (p *mtlsPeer) lastSerial() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.serials) == 0 {
		return ""
	}
	return p.serials[len(p.serials)-1].serial
}

// report fails t for every failed handshake and expired leaf the child
// met; it needs the child stopped (its last count read).
func (p *mtlsPeer) report(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.nfail != 0 || len(p.fails) != 0 {
		t.Errorf("%s: %d handshakes failed (of %d):\n%s", p.name, max(p.nfail, int64(len(p.fails))), p.ok+p.nfail, strings.Join(p.fails[:min(len(p.fails), 20)], "\n"))
	}
	if len(p.expired) != 0 {
		t.Errorf("%s was presented expired leaves: %v", p.name, p.expired)
	}
	t.Logf("%s: %d handshakes, %d peer leaves met", p.name, p.ok, len(p.serials))
}

// outageMesh is a server (restartable on its data dir and agent API
// address) and two agents, with an mTLS pair of workloads across them.
type outageMesh struct {
	t          *testing.T
	base, bin  string
	serverArgs []string
	srv        *proc
	agentAPI   string
	adminFlag  string
	bundle     string
	data       [2]string
	agents     [2]agentProc
	listener   *mtlsPeer // uidA on agent web-1
	// listenerReady is when the listener held its SVID (it listens only
	// then).
	listenerReady time.Time
	dialer        *mtlsPeer // uidB on agent web-2
}

const (
	mtlsUIDA, mtlsUIDB = 65534, 65533
	mtlsIDA            = "spiffe://cluster.local/ns/e2e/sa/mtls-a"
	mtlsIDB            = "spiffe://cluster.local/ns/e2e/sa/mtls-b"
)

func startOutageMesh(t *testing.T, svidTTL string) *outageMesh {
	t.Helper()
	m := &outageMesh{t: t, base: publicTemp(t)}
	m.bin = workloadBinary(t, m.base)
	admin := filepath.Join(m.base, "admin", "admin.sock")
	m.adminFlag = "--admin-socket=" + admin
	m.serverArgs = []string{"server", "--data-dir", filepath.Join(m.base, "server-data"), "--admin-socket", admin,
		"--socket", filepath.Join(m.base, "server", "workload.sock"), "--svid-ttl", svidTTL, "--ca-ttl", "48h"}
	m.startServer("127.0.0.1:0")

	pem, stderr, code := runCLI(t, "bundle", "show", m.adminFlag)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	m.bundle = filepath.Join(m.base, "bundle.pem")
	if err := os.WriteFile(m.bundle, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, node := range []string{"web-1", "web-2"} {
		out, stderr, code := runCLI(t, "token", "create", m.adminFlag, "--agent", "--node-id", node, "--ttl", "10m", "-o", "json")
		if code != 0 {
			t.Fatalf("token create --agent: %s", stderr)
		}
		var tok struct {
			Token string `json:"token"`
		}
		if err := json.Unmarshal([]byte(out), &tok); err != nil || tok.Token == "" {
			t.Fatalf("token create -o json: %v: %s", err, out)
		}
		m.data[i] = filepath.Join(m.base, fmt.Sprintf("agent%d-data", i+1))
		m.agents[i] = startAgent(t, m.agentAPI, m.bundle, m.data[i], filepath.Join(m.base, fmt.Sprintf("agent%d", i+1), "workload.sock"), tok.Token)
		m.agents[i].waitFor(t, "connected to the server")
	}
	for _, e := range []struct {
		id, parent string
		uid        int
	}{{mtlsIDA, agentWeb1, mtlsUIDA}, {mtlsIDB, agentWeb2, mtlsUIDB}} {
		if _, stderr, code := runCLI(t, "entry", "create", m.adminFlag, "--spiffe-id", e.id, "--selector", "unix:uid:"+strconv.Itoa(e.uid), "--parent-id", e.parent); code != 0 {
			t.Fatalf("entry create %s: %s", e.id, stderr)
		}
	}
	m.listener = startMTLS(t, m.bin, mtlsUIDA, "listen", m.agents[0].socket, mtlsIDB, "")
	var addr string
	select {
	case addr = <-m.listener.addr:
		m.listenerReady = time.Now()
	case <-m.listener.done:
		t.Fatal("the listening workload exited before listening")
	case <-time.After(30 * time.Second):
		t.Fatal("the listening workload got no SVID within 30s")
	}
	m.dialer = startMTLS(t, m.bin, mtlsUIDB, "dial", m.agents[1].socket, mtlsIDA, addr)
	m.waitHandshakes(10)
	return m
}

// startServer starts the server with its agent API on listen and waits
// for it to serve.
func (m *outageMesh) startServer(listen string) {
	m.t.Helper()
	m.srv = startMeshid(m.t, append(slicesClone(m.serverArgs), "--agent-listen", listen)...)
	serving := m.srv.waitLine(m.t, "msg=serving")
	a := regexp.MustCompile(`\bagent_api=(\S+)`).FindStringSubmatch(serving)
	if a == nil || a[1] == `""` {
		m.t.Fatalf("serving line has no agent_api: %s", serving)
	}
	m.agentAPI = a[1]
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// stopServer ends the server as an operator would (SIGTERM).
func (m *outageMesh) stopServer() {
	m.t.Helper()
	m.srv.signal(m.t, syscall.SIGTERM)
	if code := m.srv.wait(m.t); code != 0 {
		m.t.Fatalf("server exited %d on SIGTERM:\n%s", code, m.srv.output())
	}
}

// waitHandshakes waits until the dialer has done n more handshakes.
func (m *outageMesh) waitHandshakes(n int64) {
	m.t.Helper()
	from := m.dialer.okCount()
	deadline := time.Now().Add(30 * time.Second)
	for m.dialer.okCount() < from+n || m.listener.okCount() < n {
		if time.Now().After(deadline) {
			m.t.Fatalf("the workloads did not do %d handshakes within 30s (dialer %d, listener %d)", n, m.dialer.okCount()-from, m.listener.okCount())
		}
		time.Sleep(50 * time.Millisecond) // polling a condition
	}
}

// certs is the server's inventory (meshid certs list -o json).
func (m *outageMesh) certs() []*adminv1.IssuedCert {
	m.t.Helper()
	out, stderr, code := runCLI(m.t, "certs", "list", m.adminFlag, "-o", "json")
	if code != 0 {
		m.t.Fatalf("certs list: %s", stderr)
	}
	var raw []json.RawMessage
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		m.t.Fatalf("certs list -o json: %v: %s", err, out)
	}
	var list []*adminv1.IssuedCert
	for _, r := range raw {
		c := &adminv1.IssuedCert{}
		if err := protojson.Unmarshal(r, c); err != nil {
			m.t.Fatalf("certs list -o json: %v: %s", err, r)
		}
		list = append(list, c)
	}
	return list
}

// agentCerts are the serials of the SVIDs the agents hold (their node
// SVIDs and what they had signed), each with its SPIFFE ID: the server's
// own SVID, made anew at each start, is not theirs.
func (m *outageMesh) agentCerts() map[string]string {
	m.t.Helper()
	out := map[string]string{}
	for _, c := range m.certs() {
		if r := c.GetRequester(); strings.HasPrefix(r, "workload via agent ") || strings.HasPrefix(r, "agent ") {
			out[strings.ToLower(strings.TrimLeft(c.GetSerial(), "0"))] = c.GetSpiffeId()
		}
	}
	return out
}

func sameSerial(inventory, hex string) bool {
	return strings.EqualFold(strings.TrimLeft(inventory, "0"), strings.TrimLeft(hex, "0"))
}

func needSoak(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as other uids")
	}
	if testing.Short() || os.Getenv("MESHID_SOAK") != "1" {
		t.Skip("real-time outage (a 90 s server outage with 2 min SVIDs, ~3 min): set MESHID_SOAK=1 (make test does)")
	}
}

// TestServerOutageZeroFailures is issue 10's outage, with real processes
// and real time: SVIDs live 2 minutes; two workloads as other uids on two
// agents do an mTLS handshake every 150 ms; the server is stopped
// (SIGTERM) for 90 s, longer than half an SVID's life, and started again
// on its data dir. No handshake fails across the whole run, no side is
// ever shown an expired leaf, and renewals resume once the server is back
// (each side meets a new peer leaf within a minute).
func TestServerOutageZeroFailures(t *testing.T) {
	needSoak(t)
	m := startOutageMesh(t, "2m")
	// A renewal before the outage: the agents renew in real time.
	start := time.Now()
	waitUntil(t, "a renewal before the outage", 60*time.Second, func() bool {
		_, a := m.dialer.newSerialSince(start)
		_, b := m.listener.newSerialSince(start)
		return a && b
	})

	// The outage starts late in each node SVID's renewal cycle: at least
	// 40 s into its life, or once it has been renewed (a renewal cycle
	// shorter than that). Renewed only at half its 2 min life, the node
	// SVID would then expire during the outage, and the agents could not
	// get back to the server.
	first := [2]string{}
	for i := range m.data {
		first[i], _ = nodeCert(t, m.data[i])
	}
	waitUntil(t, "the node SVIDs to be 40 s old or renewed", 70*time.Second, func() bool {
		for i := range m.data {
			serial, notBefore := nodeCert(t, m.data[i])
			if serial == first[i] && time.Since(notBefore) < 40*time.Second {
				return false
			}
		}
		return true
	})

	m.stopServer()
	stopped := time.Now()
	okAtStop := m.dialer.okCount()
	// The outage is a span of real time, not a wait for anything: the
	// workloads are meanwhile served by their agents alone.
	time.Sleep(90 * time.Second)
	during := m.dialer.okCount() - okAtStop
	if want := int64(90 * time.Second / (150 * time.Millisecond) / 2); during < want {
		t.Errorf("only %d handshakes during the outage, want at least %d", during, want)
	}

	m.startServer(m.agentAPI)
	back := time.Now()
	t.Logf("server back after %v", back.Sub(stopped).Truncate(time.Millisecond))
	waitUntil(t, "renewals after the server returned", 60*time.Second, func() bool {
		_, a := m.dialer.newSerialSince(back)
		_, b := m.listener.newSerialSince(back)
		return a && b
	})
	// The new leaves are the server's, in its inventory, issued after it
	// returned.
	newest := map[string]bool{m.dialer.lastSerial(): true, m.listener.lastSerial(): true}
	for _, c := range m.certs() {
		for s := range newest {
			if sameSerial(c.GetSerial(), s) {
				if c.GetIssuedAt().AsTime().Before(back.Add(-time.Second)) {
					t.Errorf("leaf %s met after the restart was issued at %s, before the server returned (%s)", s, c.GetIssuedAt().AsTime(), back)
				}
				delete(newest, s)
			}
		}
	}
	if len(newest) != 0 {
		t.Errorf("leaves met after the restart not in the inventory: %v", newest)
	}
	m.waitHandshakes(10)
	m.dialer.stop(t)
	m.listener.stop(t)
	m.dialer.report(t)
	m.listener.report(t)
	m.agentsRunning()
}

// agentsRunning fails the test if an agent has exited.
func (m *outageMesh) agentsRunning() {
	m.t.Helper()
	for _, a := range m.agents {
		select {
		case <-a.done:
			m.t.Errorf("agent exited (%v):\n%s", a.err, a.output())
		default:
		}
	}
}

// nodeCert reads an agent's node SVID from its data dir.
func nodeCert(t *testing.T, dataDir string) (serial string, notBefore time.Time) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "node.crt"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("node.crt is not PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber.Text(16), c.NotBefore
}

// TestAgentRestartDuringOutageServesCache: the server is down, an agent is
// killed with SIGKILL and started again: before it can reach the server it
// serves its workload the same, still-valid SVID (same serial) from its
// sealed cache, and the workloads' handshakes never fail. Nothing is minted
// until the server returns: the inventory then holds exactly what it held
// before the outage, and the reconnected agent still serves that serial.
func TestAgentRestartDuringOutageServesCache(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as other uids")
	}
	// 1 h SVIDs: nothing falls due for renewal during the test, so any new
	// serial would be a re-mint.
	m := startOutageMesh(t, "1h")
	fetchSerial := func() string {
		t.Helper()
		cmd := workloadCmd(m.bin, mtlsUIDA, "", m.agents[0].socket)
		cmd.Env = append(cmd.Env, mtlsModeEnv+"=serial")
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("fetch on web-1: %v: %s", err, out)
		}
		l := strings.TrimSpace(string(out))
		if !strings.HasSuffix(l, "id="+mtlsIDA) {
			t.Fatalf("fetch on web-1: %s, want %s", l, mtlsIDA)
		}
		return strings.Fields(strings.TrimPrefix(l, "serial="))[0]
	}
	before := fetchSerial()
	if got := m.dialer.lastSerial(); got != before {
		t.Fatalf("the dialer met %s, the agent serves %s", got, before)
	}
	// The kill must find the SVID in the sealed cache: the agent writes it
	// shortly after it changes. (Comparing the file's time with when the
	// listener was seen ready raced: under load the write could land
	// before the test saw the listener, and none came after.)
	waitAgentMetric(t, m.agents[0].metrics, "meshid_agent_persisted_svids 1")
	inventory := m.agentCerts()

	m.stopServer()
	if err := m.agents[0].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-m.agents[0].done
	m.waitHandshakes(5) // the listener's source holds its SVID meanwhile
	m.agents[0] = startAgent(t, m.agentAPI, "", m.data[0], m.agents[0].socket, "")
	if got := fetchSerial(); got != before {
		t.Fatalf("the restarted agent served serial %s during the outage, want the cached %s", got, before)
	}
	// The listener's source re-dials the restarted agent; handshakes go on.
	m.waitHandshakes(10)
	m.agents[0].waitFor(t, "server unreachable")

	m.startServer(m.agentAPI)
	m.agents[0].waitFor(t, "connected to the server")
	m.agents[1].waitFor(t, "connected to the server")
	if got := fetchSerial(); got != before {
		t.Fatalf("after reconnecting the agent serves %s, want the cached %s", got, before)
	}
	if after := m.agentCerts(); !maps.Equal(after, inventory) {
		t.Errorf("the agents' SVIDs in the inventory after the outage: %v, before: %v: something was minted", after, inventory)
	}
	found := false
	for _, c := range m.certs() {
		found = found || sameSerial(c.GetSerial(), before)
	}
	if !found {
		t.Errorf("the cached serial %s is not in the inventory", before)
	}
	m.waitHandshakes(10)
	m.dialer.stop(t)
	m.listener.stop(t)
	m.dialer.report(t)
	m.listener.report(t)
	m.agentsRunning()
}

// waitUntil polls cond until it holds or d passes.
func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
		time.Sleep(100 * time.Millisecond) // polling a condition, with a deadline
	}
}

// TestAgentProcessExitsOnBanAndEvict: `meshid agent ban` makes the banned
// agent's process exit 1 with one line saying so, after removing what the
// ban revoked (node SVID, persisted SVIDs) from its data dir, so a restart
// exits 1 asking for a new token; `meshid agent evict` makes an agent
// without a usable join token exit 1 naming `meshid token create --agent`.
func TestAgentProcessExitsOnBanAndEvict(t *testing.T) {
	base := publicTemp(t)
	admin := filepath.Join(base, "admin", "admin.sock")
	adminFlag := "--admin-socket=" + admin
	srv := startMeshid(t, "server", "--data-dir", filepath.Join(base, "server-data"), "--admin-socket", admin,
		"--socket", filepath.Join(base, "server", "workload.sock"), "--agent-listen", "127.0.0.1:0")
	serving := srv.waitLine(t, "msg=serving")
	a := regexp.MustCompile(`\bagent_api=(\S+)`).FindStringSubmatch(serving)
	if a == nil {
		t.Fatalf("serving line has no agent_api: %s", serving)
	}
	pem, stderr, code := runCLI(t, "bundle", "show", adminFlag)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	bundle := filepath.Join(base, "bundle.pem")
	if err := os.WriteFile(bundle, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	var agents [2]agentProc
	var data [2]string
	for i, node := range []string{"web-1", "web-2"} {
		out, stderr, code := runCLI(t, "token", "create", adminFlag, "--agent", "--node-id", node, "--ttl", "10m")
		if code != 0 {
			t.Fatalf("token create --agent: %s", stderr)
		}
		data[i] = filepath.Join(base, node+"-data")
		agents[i] = startAgent(t, a[1], bundle, data[i], filepath.Join(base, node, "workload.sock"), strings.TrimSpace(out))
		agents[i].waitFor(t, "connected to the server")
	}
	exits := func(p agentProc, want ...string) {
		t.Helper()
		if code := p.wait(t); code != 1 {
			t.Fatalf("agent exited %d, want 1:\n%s", code, p.output())
		}
		lines := strings.Split(strings.TrimSpace(p.output()), "\n")
		last := lines[len(lines)-1]
		for _, w := range want {
			if !strings.Contains(last, w) {
				t.Fatalf("agent's last line %q does not say %q", last, w)
			}
		}
	}
	if _, stderr, code := runCLI(t, "agent", "ban", adminFlag, "web-1"); code != 0 {
		t.Fatalf("agent ban: %s", stderr)
	}
	exits(agents[0], "banned", "meshid agent unban")
	// The ban took what it held (revoked) off the disk: a restart has no
	// node identity left and needs a new token (after an unban).
	restarted := startMeshid(t, "agent", "--server", a[1], "--data-dir", data[0], "--socket", agents[0].socket)
	if code := restarted.wait(t); code != 1 || !strings.Contains(restarted.output(), "join token") {
		t.Fatalf("restart after a ban: exit %d, want 1 asking for a join token:\n%s", code, restarted.output())
	}
	for _, f := range []string{"svid-cache.sealed", "node.crt", "node.key"} {
		if _, err := os.Stat(filepath.Join(data[0], f)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s left in the banned agent's data dir: %v", f, err)
		}
	}

	if _, stderr, code := runCLI(t, "agent", "evict", adminFlag, "web-2"); code != 0 {
		t.Fatalf("agent evict: %s", stderr)
	}
	// Its join token was spent at its first start: it cannot attest again.
	exits(agents[1], "evicted", "meshid token create --agent")
	if _, err := os.Stat(filepath.Join(data[1], "node.crt")); !os.IsNotExist(err) {
		t.Fatalf("the evicted agent's node SVID: %v, want it removed", err)
	}
}
