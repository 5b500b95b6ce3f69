package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/internal/etcdtest"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/kek"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store/etcdstore"
)

// runReplica opens a server on a real etcd store named id and runs it
// with an agent API on loopback; it returns where it listens.
func runReplica(t *testing.T, eps []string, prefix, id, kekFile, dir string, fc *fakeclock.Clock) (*Server, Listening) {
	t.Helper()
	es, err := etcdstore.Open(context.Background(), etcdstore.Options{Endpoints: eps, Prefix: prefix, Replica: id, LeaseTTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), Store: es, KEKFile: kekFile, SharedKEK: true,
		SVIDTTL: time.Hour, CATTL: 48 * time.Hour, CAPrepareWindow: time.Minute, ShortPrepareWindow: true,
		Now: fc.Now, AfterFunc: fc.AfterFunc})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Listening, 1)
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, Endpoints{AdminSocket: filepath.Join(dir, id+"-admin.sock"), AgentListen: "127.0.0.1:0"}, func(l Listening) { ready <- l })
	}()
	var l Listening
	select {
	case l = <-ready:
	case err := <-done:
		t.Fatalf("run %s: %v", id, err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run %s: %v", id, err)
		}
		srv.Close()
	})
	return srv, l
}

func adminOf(t *testing.T, l Listening) adminv1.AdminServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+l.AdminSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return adminv1.NewAdminServiceClient(conn)
}

// TestActivationGatedOnFollowersAgents: the leader gates CA activation
// on the agents connected to the other replicas too. An agent on the
// follower, one of whose SDS streams has not ACKed the bundle with the
// prepared CA, holds the leader's activation back; when it ACKs, the
// leader activates. Counting only its own (no) agents, the leader saw
// no streams, a ratio of 1, and activated at once.
func TestActivationGatedOnFollowersAgents(t *testing.T) {
	c := etcdtest.Start(t, 1)
	dir, err := os.MkdirTemp("", "meshid-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	kekFile := filepath.Join(dir, "kek")
	if _, err := kek.Create(kekFile); err != nil {
		t.Fatal(err)
	}
	fc := fakeclock.New(time.Now())
	leader, leaderL := runReplica(t, c.Endpoints(), "/peer/", "a", kekFile, dir, fc)
	follower, followerL := runReplica(t, c.Endpoints(), "/peer/", "b", kekFile, dir, fc)
	if !leader.Leading() || follower.Leading() {
		t.Fatalf("leading: a %v, b %v; want a alone", leader.Leading(), follower.Leading())
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tok, _, err := follower.CreateAgentToken(ctx, "web-1", time.Hour, "test")
	if err != nil {
		t.Fatal(err)
	}
	al, stopAgent := runTestAgent(t, ctx, agent.Config{Server: followerL.AgentAddr, JoinToken: tok, TrustBundle: follower.BundleCerts(),
		DataDir: t.TempDir(), Socket: filepath.Join(dir, "workload.sock")})
	t.Cleanup(stopAgent)
	good, lag := openProxy(t, al.Socket), openProxy(t, al.Socket)
	_ = good
	g := &gatePlane{srv: leader, fc: fc, admin: adminOf(t, leaderL)}
	g.waitStatus(t, "the follower's agent and its two streams, on the leader", func(r *adminv1.StatusResponse) bool {
		return len(r.GetAgents()) == 1 && r.GetAgents()[0].GetReplica() == "b" && r.GetStreams() == 2 && r.GetStreamsNewest() == 2
	})

	active := g.activeID()
	lag.setAcking(false)
	pol, av := leader.policy(), leader.caByID(active)
	fc.Advance(pol.PrepareTime(av.lc()).Sub(fc.Now()) + time.Millisecond)
	pv := leader.preparedCA()
	if pv == nil {
		t.Fatal("no CA prepared at prepare-at")
	}
	g.waitStatus(t, "one of the follower's streams on the prepared CA, on the leader", func(r *adminv1.StatusResponse) bool {
		return r.GetStreams() == 2 && r.GetStreamsPrepared() == 1
	})
	fc.Advance(pol.ActivateTime(av.lc(), pv.lc()).Sub(fc.Now()) + time.Millisecond)
	g.checkHeld(t, pv.rec.ID, active, 1, 2)

	lag.setAcking(true)
	g.waitActive(t, pv.rec.ID)
}
