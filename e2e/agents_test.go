package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/status"
)

// A workload child is this test binary run as another uid against one
// agent's socket. init, not TestMain, picks the mode up so that the child
// never runs the test machinery.
const (
	wlModeEnv = "MESHID_E2E_WL"      // fetch or watch
	wlSockEnv = "MESHID_E2E_WL_SOCK" // the workload socket
	wlWantEnv = "MESHID_E2E_WL_WANT" // fetch: the line to wait for
)

func init() {
	mode := os.Getenv(wlModeEnv)
	if mode == "" {
		return
	}
	addr := workloadapi.WithAddr("unix://" + os.Getenv(wlSockEnv))
	switch mode {
	case "fetch":
		os.Exit(wlFetch(addr, os.Getenv(wlWantEnv)))
	case "watch":
		os.Exit(wlWatch(addr))
	}
	fmt.Fprintln(os.Stderr, "unknown workload mode", mode)
	os.Exit(2)
}

// wlResult renders what a Workload API call gave: "ids=" and the last path
// segments of the SPIFFE IDs, sorted, or "err=" and the gRPC code.
func wlResult(ids []string, err error) string {
	if err != nil {
		return "err=" + status.Code(err).String()
	}
	for i, id := range ids {
		ids[i] = id[strings.LastIndex(id, "/")+1:]
	}
	slices.Sort(ids)
	return "ids=" + strings.Join(ids, ",")
}

// wlFetch fetches X.509-SVIDs until the result is want (entries reach an
// agent asynchronously) or 20 s pass, and prints the last result.
func wlFetch(addr workloadapi.ClientOption, want string) int {
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		svids, err := workloadapi.FetchX509SVIDs(ctx, addr)
		cancel()
		var ids []string
		for _, s := range svids {
			ids = append(ids, s.ID.String())
		}
		got := wlResult(ids, err)
		if got == want || time.Now().After(deadline) {
			fmt.Println(got)
			return 0
		}
		time.Sleep(50 * time.Millisecond) // polling a condition
	}
}

type lineWatcher struct{}

func (lineWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	var ids []string
	for _, s := range c.SVIDs {
		ids = append(ids, s.ID.String())
	}
	fmt.Println(wlResult(ids, nil))
}

func (lineWatcher) OnX509ContextWatchError(err error) {
	if !errors.Is(err, context.Canceled) {
		fmt.Println(wlResult(nil, err))
	}
}

// wlWatch prints every update and error of one Workload API watch (which
// go-spiffe re-dials after an error) until stdin closes.
func wlWatch(addr workloadapi.ClientOption) int {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	err := workloadapi.WatchX509Context(ctx, lineWatcher{}, addr)
	if err != nil && !errors.Is(err, context.Canceled) && ctx.Err() == nil {
		fmt.Fprintln(os.Stderr, "watch:", err)
		return 1
	}
	return 0
}

// publicTemp is a short temp directory other users can traverse (agents'
// sockets and the workload binary live below it).
func publicTemp(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "mse2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// workloadBinary copies this test binary where other uids can execute it
// (the go build directory is root's, 0700).
func workloadBinary(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "wl.test")
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

func workloadCmd(bin string, uid int, mode, socket string) *exec.Cmd {
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), wlModeEnv+"="+mode, wlSockEnv+"="+socket)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	return cmd
}

// fetchAs runs one fetching workload as uid on socket and returns its
// result once it is want or its deadline passed.
func fetchAs(t *testing.T, bin string, uid int, socket, want string) string {
	t.Helper()
	cmd := workloadCmd(bin, uid, "fetch", socket)
	cmd.Env = append(cmd.Env, wlWantEnv+"="+want)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("workload uid %d on %s: %v", uid, socket, err)
	}
	return strings.TrimSpace(string(out))
}

// watcher is a watching workload; lines carries what it prints.
type watcher struct {
	lines chan string
	last  string
}

func watchAs(t *testing.T, bin string, uid int, socket string) *watcher {
	t.Helper()
	cmd := workloadCmd(bin, uid, "watch", socket)
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
	w := &watcher{lines: make(chan string, 64)}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			w.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		stdin.Close() // the watcher stops on EOF
		done := make(chan error, 1)
		go func() { <-copied; done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("watcher uid %d: %v", uid, err)
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Error("watcher did not stop")
		}
	})
	return w
}

// next returns the watcher's next line that differs from the one before:
// a bundle push repeats the same SVIDs, which says nothing here.
func (w *watcher) next(t *testing.T) string {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l := <-w.lines:
			if l != w.last {
				w.last = l
				return l
			}
		case <-deadline:
			t.Fatal("watcher printed nothing new for 30s")
			return ""
		}
	}
}

// agentProc is a `meshid agent` subprocess.
type agentProc struct {
	*proc
	socket, metrics string
}

func startAgent(t *testing.T, server, bundle, dataDir, socket, token string) agentProc {
	t.Helper()
	args := []string{"agent", "--server", server, "--data-dir", dataDir, "--socket", socket, "--metrics-listen", "127.0.0.1:0"}
	if token != "" {
		args = append(args, "--join-token", token)
	}
	if bundle != "" {
		args = append(args, "--trust-bundle", bundle)
	}
	p := startMeshid(t, args...)
	line := p.waitLine(t, "agent serving")
	m := regexp.MustCompile(`\bmetrics=(\S+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("agent serving line without metrics: %s", line)
	}
	return agentProc{proc: p, socket: socket, metrics: m[1]}
}

// The whole node-agent flow with real processes: one server, two agents
// (web-1, web-2) with their own data dirs and sockets, and workloads as
// three other uids on each. Every workload gets exactly its entries; an
// entry with --parent-id is served only by that agent (the other agent's
// matching workload holds no identity, PermissionDenied) and never by the
// server's own socket; an entry created while a workload watches is pushed
// on the open stream, and moving its parent moves it; an agent killed with
// SIGKILL restarts from its data dir without a token or bundle file as the
// same node, and its workloads reconnect. A third agent given a spent
// token is refused and exits 1.
func TestAgentsServeTheirEntries(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as other uids")
	}
	const uidA, uidB, uidC = 65534, 65533, 65532
	base := publicTemp(t)
	bin := workloadBinary(t, base)
	admin := filepath.Join(base, "admin", "admin.sock")
	serverSock := filepath.Join(base, "server", "workload.sock")
	srv := startMeshid(t, "server", "--data-dir", filepath.Join(base, "server-data"), "--admin-socket", admin, "--socket", serverSock, "--agent-listen", "127.0.0.1:0")
	serving := srv.waitLine(t, "msg=serving")
	m := regexp.MustCompile(`\bagent_api=(\S+)`).FindStringSubmatch(serving)
	if m == nil || m[1] == `""` {
		t.Fatalf("serving line has no agent_api: %s", serving)
	}
	agentAPI := m[1]
	adminFlag := "--admin-socket=" + admin

	pem, stderr, code := runCLI(t, "bundle", "show", adminFlag)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	bundle := filepath.Join(base, "bundle.pem")
	if err := os.WriteFile(bundle, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	token := func(node string) string {
		t.Helper()
		out, stderr, code := runCLI(t, "token", "create", adminFlag, "--agent", "--node-id", node, "--ttl", "10m", "-o", "json")
		if code != 0 {
			t.Fatalf("token create --agent: %s", stderr)
		}
		var resp struct {
			Token    string `json:"token"`
			SpiffeID string `json:"spiffe_id"`
		}
		if err := json.Unmarshal([]byte(out), &resp); err != nil || resp.Token == "" {
			t.Fatalf("token create -o json: %v: %s", err, out)
		}
		if want := "spiffe://cluster.local/meshid/agent/join/" + node; resp.SpiffeID != want {
			t.Fatalf("agent token for %s, want %s", resp.SpiffeID, want)
		}
		return resp.Token
	}
	data1, data2 := filepath.Join(base, "agent1-data"), filepath.Join(base, "agent2-data")
	tok2 := token("web-2")
	a1 := startAgent(t, agentAPI, bundle, data1, filepath.Join(base, "agent1", "workload.sock"), token("web-1"))
	a2 := startAgent(t, agentAPI, bundle, data2, filepath.Join(base, "agent2", "workload.sock"), tok2)
	for _, a := range []struct {
		p  agentProc
		id string
	}{{a1, agentWeb1}, {a2, agentWeb2}} {
		if l := a.p.waitLine(t, "attested"); !strings.Contains(l, "node_id="+a.id) {
			t.Fatalf("agent attested as %s, want %s", l, a.id)
		}
	}

	// The spent token attests nobody else.
	a3 := startAgent(t, agentAPI, bundle, filepath.Join(base, "agent3-data"), filepath.Join(base, "agent3", "workload.sock"), tok2)
	// It exits 1 saying why, rather than retrying a token that can never
	// work.
	if code := a3.wait(t); code != 1 || !strings.Contains(a3.output(), "attestation refused") || !strings.Contains(a3.output(), "already used") {
		t.Fatalf("agent with a spent token: exit %d, want 1 with the server's refusal:\n%s", code, a3.output())
	}

	entry := func(name string, uid int, parent string) (id string) {
		t.Helper()
		args := []string{"entry", "create", adminFlag, "--spiffe-id", "spiffe://cluster.local/ns/e2e/sa/" + name, "--selector", "unix:uid:" + strconv.Itoa(uid), "-o", "json"}
		if parent != "" {
			args = append(args, "--parent-id", parent)
		}
		stdout, stderr, code := runCLI(t, args...)
		if code != 0 {
			t.Fatalf("%v: %s", args, stderr)
		}
		return entryJSON(t, stdout).GetId()
	}
	entry("c-on-web1", uidC, agentWeb1)
	entry("a-on-web1", uidA, agentWeb1)
	entry("a", uidA, "")
	entry("b", uidB, "")
	// b, created last, reaching both agents means every entry before it
	// has: entries are pushed in store order. Only then does a refusal say
	// something.
	for _, a := range []agentProc{a1, a2} {
		if got := fetchAs(t, bin, uidB, a.socket, "ids=b"); got != "ids=b" {
			t.Fatalf("uid %d on %s: %s, want ids=b", uidB, a.socket, got)
		}
	}
	for _, c := range []struct {
		socket string
		uid    int
		want   string
	}{
		{a1.socket, uidA, "ids=a,a-on-web1"},
		{a1.socket, uidC, "ids=c-on-web1"},
		{a2.socket, uidA, "ids=a"},
		{a2.socket, uidC, "err=PermissionDenied"},
		{serverSock, uidA, "ids=a"},
		{serverSock, uidC, "err=PermissionDenied"},
	} {
		if got := fetchAs(t, bin, c.uid, c.socket, c.want); got != c.want {
			t.Errorf("uid %d on %s: %s, want %s", c.uid, c.socket, got, c.want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// Pushed: a workload watching on web-2 receives new entries on its open
	// stream, with no error (go-spiffe reports one before every re-dial) and
	// so no reconnect, and none meant for web-1.
	w := watchAs(t, bin, uidB, a2.socket)
	if l := w.next(t); l != "ids=b" {
		t.Fatalf("watcher on web-2 first got %s, want ids=b", l)
	}
	var moved string
	for _, step := range []struct{ name, parent, want string }{
		{"b-on-web1", agentWeb1, ""},
		{"b2", "", "ids=b,b2"},
		{"b-on-web2", agentWeb2, "ids=b,b-on-web2,b2"},
	} {
		created := time.Now()
		moved = entry(step.name, uidB, step.parent)
		if step.want == "" {
			continue // the next step's update shows it was not pushed here
		}
		if l := w.next(t); l != step.want {
			t.Fatalf("after creating %s the watcher on web-2 got %s, want %s", step.name, l, step.want)
		}
		t.Logf("entry %s reached the watching workload %v after entry create returned", step.name, time.Since(created))
	}
	// Moving an entry to the other agent takes it from this one at once.
	if _, stderr, code := runCLI(t, "entry", "update", adminFlag, moved, "--parent-id", agentWeb1); code != 0 {
		t.Fatalf("entry update --parent-id: %s", stderr)
	}
	if l := w.next(t); l != "ids=b,b2" {
		t.Fatalf("after moving b-on-web2 to web-1 the watcher on web-2 got %s, want ids=b,b2", l)
	}
	if got := fetchAs(t, bin, uidB, a1.socket, "ids=b,b-on-web1,b-on-web2,b2"); got != "ids=b,b-on-web1,b-on-web2,b2" {
		t.Fatalf("uid %d on web-1 after the move: %s", uidB, got)
	}

	// kill -9 web-1 while a workload watches on it, restart it on the same
	// data dir without a token: the same node, and the workload is served
	// again on its own.
	wa := watchAs(t, bin, uidA, a1.socket)
	if l := wa.next(t); l != "ids=a,a-on-web1" {
		t.Fatalf("watcher on web-1 first got %s", l)
	}
	if err := a1.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-a1.done
	if l := wa.next(t); !strings.HasPrefix(l, "err=") {
		t.Fatalf("watcher on the killed agent got %s, want an error", l)
	}
	// Neither a token nor the bundle file: both first-contact only.
	a1 = startAgent(t, agentAPI, "", data1, a1.socket, "")
	if l := a1.waitLine(t, "connected to the server"); !strings.Contains(l, "node_id="+agentWeb1) {
		t.Fatalf("restarted agent connected as %s, want %s", l, agentWeb1)
	}
	if strings.Contains(a1.output(), "attested") {
		t.Fatalf("restarted agent attested again instead of using its data dir:\n%s", a1.output())
	}
	// Errors while go-spiffe re-dials, then perhaps one SVID before the
	// other is signed again, then both.
	for {
		l := wa.next(t)
		if l == "ids=a,a-on-web1" {
			break
		}
		if !strings.HasPrefix(l, "err=") && l != "ids=a" && l != "ids=a-on-web1" {
			t.Fatalf("watcher on the restarted agent got %s", l)
		}
	}
	if got := fetchAs(t, bin, uidC, a1.socket, "ids=c-on-web1"); got != "ids=c-on-web1" {
		t.Fatalf("uid %d on the restarted web-1: %s", uidC, got)
	}
	waitAgentMetric(t, a1.metrics, "meshid_agent_connected 1")
}

// waitAgentMetric polls an agent's /metrics until a line is exactly want.
func waitAgentMetric(t *testing.T, addr, want string) {
	t.Helper()
	flagServer{serving: "metrics=" + addr}.waitMetric(t, want)
}
