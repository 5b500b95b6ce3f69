package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/bench"
	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/kek"
)

// The HA tests (issue 13): real meshid server processes on --store etcd
// sharing a real 3-member etcd cluster (TLS with client certificates, as
// in production), agents given every replica, workloads as other uids.

// haLeaseTTL is the replicas' election lease: short, so a killed leader
// is replaced within seconds.
const haLeaseTTL = "3s"

type haReplica struct {
	id, admin, agentAddr, data string
	args                       []string
	p                          *proc
}

type haPlane struct {
	t        *testing.T
	base     string
	etcd     *etcdtest.Cluster
	replicas []*haReplica
	bundle   string
}

// freeAddr is a loopback address nothing listens on now: a replica keeps
// it across restarts, so the agents' --server list stays true.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startHA starts a 3-member etcd and n replicas on it with extra server
// flags, and waits until they all serve and one leads.
func startHA(t *testing.T, n int, extra ...string) *haPlane {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run workloads as other uids")
	}
	h := &haPlane{t: t, base: publicTemp(t)}
	h.etcd = etcdtest.Start(t, 3, etcdtest.Options{TLS: true})
	kekFile := filepath.Join(h.base, "kek")
	if _, err := kek.Create(kekFile); err != nil {
		t.Fatal(err)
	}
	pki := h.etcd.PKI()
	for i := range n {
		r := &haReplica{
			id:        fmt.Sprintf("r%d", i),
			admin:     filepath.Join(h.base, fmt.Sprintf("r%d-admin", i), "admin.sock"),
			agentAddr: freeAddr(t),
			data:      filepath.Join(h.base, fmt.Sprintf("r%d-data", i)),
		}
		r.args = append([]string{"server", "--store", "etcd", "--etcd-endpoints", strings.Join(h.etcd.Endpoints(), ","),
			"--etcd-ca", pki.CAFile, "--etcd-cert", pki.ClientCert, "--etcd-key", pki.ClientKey,
			"--etcd-lease-ttl", haLeaseTTL, "--replica-id", r.id, "--kek-file", kekFile,
			"--data-dir", r.data, "--admin-socket", r.admin,
			"--socket", filepath.Join(h.base, fmt.Sprintf("r%d", i), "workload.sock"),
			"--agent-listen", r.agentAddr}, extra...)
		h.replicas = append(h.replicas, r)
	}
	// All at once, as a Deployment would: one makes the CA, the others
	// start as followers.
	for _, r := range h.replicas {
		r.p = startMeshid(t, r.args...)
	}
	for _, r := range h.replicas {
		r.p.waitFor(t, "msg=serving")
	}
	h.waitLeader(nil)
	pem, stderr, code := runCLI(t, "bundle", "show", "--admin-socket="+h.replicas[0].admin)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	h.bundle = filepath.Join(h.base, "bundle.pem")
	if err := os.WriteFile(h.bundle, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	return h
}

// servers is the agents' --server list: every replica.
func (h *haPlane) servers() string {
	var a []string
	for _, r := range h.replicas {
		a = append(a, r.agentAddr)
	}
	return strings.Join(a, ",")
}

type haStatus struct {
	Store struct {
		Backend  string `json:"backend"`
		Leader   string `json:"leader"`
		Replica  string `json:"replica"`
		Health   string `json:"health"`
		Replicas []struct {
			ID        string   `json:"id"`
			Addresses []string `json:"addresses"`
		} `json:"replicas"`
		EtcdMembers []struct {
			Healthy bool `json:"healthy"`
		} `json:"etcd_members"`
	} `json:"store"`
}

// status is meshid status -o json on replica r.
func (h *haPlane) status(r *haReplica) (haStatus, error) {
	out, stderr, code := runCLI(h.t, "status", "--admin-socket="+r.admin, "-o", "json")
	var st haStatus
	if code != 0 {
		return st, fmt.Errorf("status on %s: %s", r.id, stderr)
	}
	return st, json.Unmarshal([]byte(out), &st)
}

// waitLeader waits until the replicas still running (all but skip) agree
// on one leader among them, and returns it.
func (h *haPlane) waitLeader(skip *haReplica) *haReplica {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		leader := ""
		agree := true
		for _, r := range h.replicas {
			if r == skip {
				continue
			}
			st, err := h.status(r)
			if err != nil {
				agree, last = false, err.Error()
				break
			}
			if st.Store.Leader == "" || (leader != "" && st.Store.Leader != leader) || (skip != nil && st.Store.Leader == skip.id) {
				agree, last = false, fmt.Sprintf("%s sees leader %q", r.id, st.Store.Leader)
				break
			}
			leader = st.Store.Leader
		}
		if agree {
			for _, r := range h.replicas {
				if r.id == leader {
					return r
				}
			}
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("the replicas did not agree on a leader within 30s: %s", last)
		}
		time.Sleep(100 * time.Millisecond) // polling a condition
	}
}

// checkAnnounced waits until meshid status on every replica lists every
// replica with the agent address it serves on (a replica that announced
// itself before it listened must announce again once it does).
func (h *haPlane) checkAnnounced() {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		missing := ""
		for _, r := range h.replicas {
			st, err := h.status(r)
			if err != nil {
				h.t.Fatal(err)
			}
			have := map[string]bool{}
			for _, rep := range st.Store.Replicas {
				for _, a := range rep.Addresses {
					have[rep.ID+"="+a] = true
				}
			}
			for _, o := range h.replicas {
				if !have[o.id+"=agent="+o.agentAddr] {
					missing = fmt.Sprintf("%s does not list %s with agent=%s: %+v", r.id, o.id, o.agentAddr, st.Store.Replicas)
				}
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatal(missing)
		}
		time.Sleep(100 * time.Millisecond) // polling a condition
	}
}

// agentToken makes a join token for node on replica r.
func (h *haPlane) agentToken(r *haReplica, node string) string {
	h.t.Helper()
	out, stderr, code := runCLI(h.t, "token", "create", "--admin-socket="+r.admin, "--agent", "--node-id", node, "--ttl", "10m", "-o", "json")
	if code != 0 {
		h.t.Fatalf("token create --agent: %s", stderr)
	}
	var tok struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(out), &tok); err != nil || tok.Token == "" {
		h.t.Fatalf("token create -o json: %v: %s", err, out)
	}
	return tok.Token
}

// startAgent starts an agent for node given every replica and returns it
// with the replica it first connected to.
func (h *haPlane) startAgent(i int, node string) (agentProc, *haReplica) {
	h.t.Helper()
	a := startAgent(h.t, h.servers(), h.bundle, filepath.Join(h.base, fmt.Sprintf("agent%d-data", i)),
		filepath.Join(h.base, fmt.Sprintf("agent%d", i), "workload.sock"), h.agentToken(h.replicas[0], node))
	l := a.waitLine(h.t, "connected to the server")
	m := regexp.MustCompile(`\bserver=(\S+)`).FindStringSubmatch(l)
	if m == nil {
		h.t.Fatalf("connected line without server: %s", l)
	}
	for _, r := range h.replicas {
		if r.agentAddr == m[1] {
			return a, r
		}
	}
	h.t.Fatalf("agent connected to %s, not a replica (%s)", m[1], h.servers())
	return agentProc{}, nil
}

// mtls starts the mTLS pair of outage_test.go across two agents: uid A
// listens on agent a, uid B dials from agent b, each with an entry
// parented to its agent, created on replica r.
func (h *haPlane) mtls(r *haReplica, a, b agentProc) (listener, dialer *mtlsPeer) {
	h.t.Helper()
	bin := workloadBinary(h.t, h.base)
	for _, e := range []struct {
		id, parent string
		uid        int
	}{{mtlsIDA, agentWeb1, mtlsUIDA}, {mtlsIDB, agentWeb2, mtlsUIDB}} {
		if _, stderr, code := runCLI(h.t, "entry", "create", "--admin-socket="+r.admin, "--spiffe-id", e.id, "--selector", "unix:uid:"+strconv.Itoa(e.uid), "--parent-id", e.parent); code != 0 {
			h.t.Fatalf("entry create %s: %s", e.id, stderr)
		}
	}
	listener = startMTLS(h.t, bin, mtlsUIDA, "listen", a.socket, mtlsIDB, "")
	var addr string
	select {
	case addr = <-listener.addr:
	case <-listener.done:
		h.t.Fatal("the listening workload exited before listening")
	case <-time.After(30 * time.Second):
		h.t.Fatal("the listening workload got no SVID within 30s")
	}
	dialer = startMTLS(h.t, bin, mtlsUIDB, "dial", b.socket, mtlsIDA, addr)
	waitHandshakesOf(h.t, listener, dialer, 10)
	return listener, dialer
}

// waitHandshakesOf waits until the dialer has done n more handshakes.
func waitHandshakesOf(t *testing.T, listener, dialer *mtlsPeer, n int64) {
	t.Helper()
	from := dialer.okCount()
	deadline := time.Now().Add(30 * time.Second)
	for dialer.okCount() < from+n || listener.okCount() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the workloads did not do %d handshakes within 30s (dialer %d, listener %d)", n, dialer.okCount()-from, listener.okCount())
		}
		time.Sleep(50 * time.Millisecond) // polling a condition
	}
}

// kill ends replica r with SIGKILL, as a node loss would.
func (r *haReplica) kill(t *testing.T) {
	t.Helper()
	_ = r.p.cmd.Process.Kill()
	<-r.p.done
}

// restart starts a killed replica again with its flags.
func (h *haPlane) restart(r *haReplica) {
	h.t.Helper()
	r.p = startMeshid(h.t, r.args...)
	r.p.waitFor(h.t, "msg=serving")
}

// TestHAEntryThroughAnotherReplica: an entry created on one replica is
// pushed to a workload waiting on an agent connected to the other, and the
// same entry created on both at once is created exactly once.
func TestHAEntryThroughAnotherReplica(t *testing.T) {
	t.Parallel() // own etcd, ports and dirs; mostly waiting on lease and window timers
	h := startHA(t, 2)
	h.checkAnnounced()
	a, via := h.startAgent(0, "web-1")
	other := h.replicas[0]
	if other == via {
		other = h.replicas[1]
	}
	bin := workloadBinary(t, h.base)
	w := watchAs(t, bin, 65534, a.socket)
	if got := w.next(t); !strings.HasPrefix(got, "err=") {
		t.Fatalf("before any entry the workload got %q, want an error", got)
	}
	const id = "spiffe://cluster.local/ns/ha/sa/pushed"
	if _, stderr, code := runCLI(t, "entry", "create", "--admin-socket="+other.admin, "--spiffe-id", id, "--selector", "unix:uid:65534"); code != 0 {
		t.Fatalf("entry create on %s: %s", other.id, stderr)
	}
	if got := w.next(t); got != "ids=pushed" {
		t.Fatalf("the workload on the agent connected to %s got %q after the entry was created on %s; want %s", via.id, got, other.id, id)
	}

	// The same entry on both replicas at once, eight times over.
	for round := range 8 {
		sid := fmt.Sprintf("spiffe://cluster.local/ns/ha/sa/race-%d", round)
		codes := make(chan int, 2)
		for _, r := range h.replicas {
			go func() {
				_, _, code := runCLI(t, "entry", "create", "--admin-socket="+r.admin, "--spiffe-id", sid, "--selector", "unix:uid:1234")
				codes <- code
			}()
		}
		ok := 0
		for range 2 {
			if <-codes == 0 {
				ok++
			}
		}
		if ok != 1 {
			t.Fatalf("round %d: %d of 2 concurrent creates of one entry succeeded; want exactly 1", round, ok)
		}
		out, stderr, code := runCLI(t, "entry", "list", "--admin-socket="+via.admin, "-o", "json")
		if code != 0 {
			t.Fatalf("entry list: %s", stderr)
		}
		if n := strings.Count(out, `"`+sid+`"`); n != 1 {
			t.Fatalf("round %d: %s listed %d times; want 1", round, sid, n)
		}
	}
}

// TestHAQuorumLoss: with 2 of 3 etcd members stopped, writes are refused
// with Unavailable and a reason, status says so, and workloads keep their
// SVIDs and their handshakes; when the members return, writes work again
// without restarting meshid.
func TestHAQuorumLoss(t *testing.T) {
	t.Parallel() // own etcd, ports and dirs; mostly waiting on lease and window timers
	h := startHA(t, 2)
	a1, _ := h.startAgent(0, "web-1")
	a2, _ := h.startAgent(1, "web-2")
	listener, dialer := h.mtls(h.replicas[0], a1, a2)

	h.etcd.Stop(t, 1)
	h.etcd.Stop(t, 2)
	r := h.replicas[1]
	_, stderr, code := runCLI(t, "entry", "create", "--admin-socket="+r.admin, "--spiffe-id", "spiffe://cluster.local/ns/ha/sa/noquorum", "--selector", "unix:uid:4321")
	if code != 1 || !strings.Contains(stderr, "etcd") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Fatalf("entry create without quorum: exit %d, stderr %q; want 1 and one line naming etcd", code, stderr)
	}
	// Readiness and status say why, once the probe has seen it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := h.status(r)
		if err == nil && st.Store.Health != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never reported the lost quorum: %+v %v", st, err)
		}
		time.Sleep(100 * time.Millisecond) // polling a condition
	}
	waitHandshakesOf(t, listener, dialer, 20)

	h.etcd.Restart(t, 1)
	h.etcd.Restart(t, 2)
	deadline = time.Now().Add(60 * time.Second)
	for {
		_, stderr, code := runCLI(t, "entry", "create", "--admin-socket="+r.admin, "--spiffe-id", "spiffe://cluster.local/ns/ha/sa/quorum-back", "--selector", "unix:uid:4321")
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("writes did not resume within 60s of the quorum's return: %s", stderr)
		}
		time.Sleep(200 * time.Millisecond) // polling a condition
	}
	out, stderr, code := runCLI(t, "entry", "list", "--admin-socket="+h.replicas[0].admin, "-o", "json")
	if code != 0 {
		t.Fatalf("entry list: %s", stderr)
	}
	if strings.Contains(out, "noquorum") || !strings.Contains(out, "quorum-back") {
		t.Fatalf("after the quorum returned, the entries are not the ones acknowledged:\n%s", out)
	}
	waitHandshakesOf(t, listener, dialer, 10)
	listener.report(t)
	dialer.report(t)
}

// caStates is the state of every CA in the bundle, by ID, as replica r
// shows them; it fails t unless exactly one is active (an activation is
// one transaction) and at most one prepared (two replicas each preparing
// one would show two).
func (h *haPlane) caStates(r *haReplica) map[string]string {
	h.t.Helper()
	out, stderr, code := runCLI(h.t, "ca", "show", "--admin-socket="+r.admin, "-o", "json")
	if code != 0 {
		h.t.Fatalf("ca show: %s", stderr)
	}
	var cas []struct {
		ID    string `json:"id"`
		State string `json:"state"`
	}
	if err := json.Unmarshal([]byte(out), &cas); err != nil {
		h.t.Fatalf("ca show -o json: %v\n%s", err, out)
	}
	states := map[string]string{}
	n := map[string]int{}
	for _, c := range cas {
		states[c.ID] = c.State
		n[c.State]++
	}
	if n["active"] != 1 || n["prepared"] > 1 {
		h.t.Fatalf("CAs on %s: %v; want one active and at most one prepared", r.id, states)
	}
	return states
}

// stateOf returns the ID of the one CA in state, or "" if there is none
// or more than one.
func stateOf(states map[string]string, state string) string {
	found := ""
	for id, s := range states {
		if s == state {
			if found != "" {
				return ""
			}
			found = id
		}
	}
	return found
}

// TestHALeaderKilledBetweenPrepareAndActivate: the leader prepares the
// next CA on its own (the lifecycle fractions make that due at once) and
// is killed with SIGKILL before activating it. The other replica takes the
// leadership when the lease lapses, activates that CA when its publication
// window has passed, exactly once, without preparing another, and two
// workloads on agents given both replicas keep doing mTLS handshakes
// through it with zero failures.
func TestHALeaderKilledBetweenPrepareAndActivate(t *testing.T) {
	t.Parallel() // own etcd, ports and dirs; mostly waiting on lease and window timers
	// --svid-ttl 1m is the floor, and so the publication window: the
	// activation falls a minute after the prepare.
	h := startHA(t, 2, "--svid-ttl", "1m", "--ca-ttl", "2h", "--ca-prepare-at", "0.00001", "--ca-activate-at", "0.00002")
	a1, _ := h.startAgent(0, "web-1")
	a2, _ := h.startAgent(1, "web-2")
	leader := h.waitLeader(nil)
	deadline := time.Now().Add(30 * time.Second)
	var first, prepared string
	for {
		states := h.caStates(leader)
		if first, prepared = stateOf(states, "active"), stateOf(states, "prepared"); prepared != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the leader prepared no CA within 30s")
		}
		time.Sleep(100 * time.Millisecond) // polling a condition
	}
	listener, dialer := h.mtls(leader, a1, a2)

	killed := time.Now()
	leader.kill(t)
	next := h.waitLeader(leader)
	t.Logf("%s led %s after %s was killed (lease %s)", next.id, time.Since(killed).Round(time.Millisecond), leader.id, haLeaseTTL)

	// The CA the dead leader prepared is the one activated, and no other
	// was prepared before it (caStates fails on two prepared). With these
	// fractions the new CA's successor is prepared at once after it.
	deadline = time.Now().Add(150 * time.Second)
	for {
		states := h.caStates(next)
		if states[prepared] == "active" {
			if states[first] != "retired" {
				t.Fatalf("CAs %v: the first CA %s is not retired", states, first)
			}
			break
		}
		if p := stateOf(states, "prepared"); p != prepared || states[first] != "active" {
			t.Fatalf("CAs %v before %s was activated: want %s active and it prepared", states, prepared, first)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new leader did not activate the prepared CA: %v", states)
		}
		time.Sleep(250 * time.Millisecond) // polling a condition
	}
	// The workloads renew onto the new CA and keep handshaking.
	since := time.Now()
	deadline = time.Now().Add(90 * time.Second)
	for {
		if _, ok := dialer.newSerialSince(since); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the dialer met no peer leaf renewed after the activation within 90s")
		}
		time.Sleep(100 * time.Millisecond) // polling a condition
	}
	waitHandshakesOf(t, listener, dialer, 10)

	// The killed replica comes back as a follower; still one activation.
	h.restart(leader)
	if l := h.waitLeader(nil); l != next {
		t.Fatalf("after %s returned, %s leads; want %s still", leader.id, l.id, next.id)
	}
	h.caStates(leader) // one active, at most one prepared, as the restarted replica sees it
	listener.report(t)
	dialer.report(t)
}

// TestHAKillReplicasUnderMint: meshid bench mint spread over three
// replicas while replicas are killed with SIGKILL and restarted at random
// moments: every serial a client received is in the shared inventory, and
// no serial was handed out twice.
func TestHAKillReplicasUnderMint(t *testing.T) {
	t.Parallel() // own etcd, ports and dirs; mostly waiting on lease and window timers
	h := startHA(t, 3)
	var socks []string
	for _, r := range h.replicas {
		socks = append(socks, r.admin)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	type result struct {
		res bench.MintResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := bench.Mint(ctx, bench.MintConfig{AdminSockets: socks, SpiffeID: "spiffe://cluster.local/ns/ha/sa/mint",
			Concurrency: 6, Requests: 4000, VerifyInventory: true})
		done <- result{res, err}
	}()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 13))
	kills := 0
	var got result
loop:
	for {
		select {
		case got = <-done:
			break loop
		case <-time.After(time.Duration(100+rng.IntN(600)) * time.Millisecond): // a random moment, not a wait for a condition
			r := h.replicas[rng.IntN(len(h.replicas))]
			r.kill(t)
			kills++
			h.restart(r)
		}
	}
	// got.err reports failed requests (those to a replica as it died);
	// what matters is below.
	res := got.res
	t.Logf("%d kills; %d SVIDs minted, %d errors (first: %s), %d failovers", kills, res.Requests-res.Errors, res.Errors, res.FirstError, res.Failovers)
	if kills == 0 {
		t.Fatal("the load ended before any replica was killed")
	}
	if res.Duplicates != 0 {
		t.Fatalf("%d serials handed out twice", res.Duplicates)
	}
	// Verified afterwards against every acknowledged serial, through a
	// live replica.
	if res.InventoryChecked != res.Requests-res.Errors {
		t.Fatalf("%d acknowledged serials, %d found in the inventory (err %v)", res.Requests-res.Errors, res.InventoryChecked, got.err)
	}
}
