package etcdtest

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

var (
	sharedOnce sync.Once
	shared     *Cluster
	sharedDir  string
	sharedErr  error
	prefixSeq  atomic.Int64
)

// Shared returns the endpoints of one single-member cluster started on
// first use for the whole test binary, and a key prefix no other test of
// the binary uses ("/t/<test>-<n>/"). One member, without fsync: the
// conformance suite checks the store's logic, not etcd's durability or
// failover, which tests with their own Start cluster do. A package using
// Shared calls Main from its TestMain so the cluster is stopped and its
// directory removed; without it the kernel kills the member when the test
// binary exits and the directory stays in $TMPDIR.
func Shared(t testing.TB) (endpoints []string, prefix string) {
	t.Helper()
	bin := Bin(t)
	sharedOnce.Do(func() {
		sharedDir, sharedErr = os.MkdirTemp("", "etcdtest-shared-")
		if sharedErr != nil {
			return
		}
		shared, sharedErr = start(bin, sharedDir, 1, Options{UnsafeNoFsync: true})
	})
	if sharedErr != nil {
		if shared != nil {
			shared.dumpLogs(t.Logf)
		}
		t.Fatalf("etcdtest: shared cluster: %v", sharedErr)
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	return shared.Endpoints(), fmt.Sprintf("/t/%s-%d/", name, prefixSeq.Add(1))
}

// Main runs the tests and then stops the shared cluster (if one was
// started) and removes its directory, keeping it when the tests failed.
// Use it as `func TestMain(m *testing.M) { os.Exit(etcdtest.Main(m)) }`.
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		if code != 0 {
			shared.dumpLogs(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) })
		}
		shared.stopAll()
	}
	if sharedDir != "" && code == 0 {
		_ = os.RemoveAll(sharedDir)
	}
	return code
}
