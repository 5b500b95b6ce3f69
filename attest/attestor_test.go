package attest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"google.golang.org/grpc/peer"
)

// The kinds an entry may name are exactly those the built-in attestors
// produce, each attributed to its attestor: the unix attestor's, and the
// k8s workload attestor's, which the server declares (the node agents
// produce them).
func TestBuiltinKinds(t *testing.T) {
	var got []string
	for _, k := range Builtin().Kinds() {
		got = append(got, k.String())
		want := "unix"
		if k.Type == "k8s" {
			want = "k8s"
		}
		if by, ok := Builtin().Producer(k.String()); !ok || by != want {
			t.Errorf("producer of %s = %q %v, want %s", k, by, ok, want)
		}
	}
	if want := []string{"k8s:container-image", "k8s:container-name", "k8s:node-name", "k8s:ns", "k8s:pod-label", "k8s:pod-name", "k8s:pod-uid", "k8s:sa",
		"unix:gid", "unix:path", "unix:pid", "unix:sha256", "unix:uid"}; !slices.Equal(got, want) {
		t.Fatalf("built-in kinds %v, want %v", got, want)
	}
	for _, k := range []string{"token:id", "unix:exe", "k8s:pod-owner"} {
		if by, ok := Builtin().Producer(k); ok {
			t.Errorf("%s is produced by %q; nothing built in produces it", k, by)
		}
	}
}

func TestCheckSelector(t *testing.T) {
	digest := strings.Repeat("0123456789abcdef", 4)
	for _, v := range [][2]string{
		{"unix", "uid:0"}, {"unix", "gid:65534"}, {"unix", "pid:4294967295"},
		{"unix", "path:/usr/bin/envoy"}, {"unix", "path:/opt/my app/bin:x"}, {"unix", "sha256:" + digest},
		{"k8s", "ns:shop"}, {"k8s", "sa:db.reader"}, {"k8s", "pod-name:web-7d4b9c-xk2p"},
		{"k8s", "pod-uid:6f1c2b0e-1d2a-4c3b-9e8f-0a1b2c3d4e5f"}, {"k8s", "pod-label:app:web"},
		{"k8s", "pod-label:app.kubernetes.io/name:Web_1.0"}, {"k8s", "pod-label:canary:"},
		{"k8s", "container-name:envoy"}, {"k8s", "container-image:docker.io/library/nginx@sha256:" + digest},
		{"k8s", "container-image:nginx:1.27"}, {"k8s", "node-name:ip-10-0-0-1.ec2.internal"},
	} {
		if err := Builtin().CheckSelector(v[0], v[1]); err != nil {
			t.Errorf("%s:%s: %v", v[0], v[1], err)
		}
	}
	for _, tt := range []struct {
		typ, value string
		want       []string // in the error
	}{
		// Kubernetes refuses such names, so no pod has them.
		{"k8s", "ns:Shop", []string{"DNS-1123 label"}},
		{"k8s", "ns:" + strings.Repeat("a", 64), []string{"DNS-1123 label"}},
		{"k8s", "sa:db_reader", []string{"DNS-1123 subdomain"}},
		{"k8s", "pod-name:-web", []string{"DNS-1123 subdomain"}},
		{"k8s", "pod-uid:6F1C", []string{"not a pod UID"}},
		{"k8s", "pod-label:app", []string{"KEY:VALUE"}},
		{"k8s", "pod-label::web", []string{"qualified name"}},
		{"k8s", "pod-label:Bad_/app:web", []string{"prefix"}},
		{"k8s", "pod-label:app:-web", []string{"label value"}},
		{"k8s", "container-image:nginx 1", []string{"space or control"}},
		{"k8s", "container-image:", []string{"not an image reference"}},
		{"k8s", "node-name:", []string{"DNS-1123 subdomain"}},
		{"k8s", "ns", []string{"want k8s:ns:NAMESPACE"}},
		{"token", "id:spiffe://cluster.local/x", []string{"token:id", "no attestor", "join token"}},
		{"k8s", "bogus:x", []string{`unknown k8s selector key "bogus"`, "container-image, container-name, node-name, ns, pod-label, pod-name, pod-uid, sa"}},
		{"docker", "image:x", []string{`unknown selector type "docker"`, "known: k8s, unix"}},
		{"unix", "exe:/bin/x", []string{`unknown unix selector key "exe"`, "gid, path, pid, sha256, uid"}},
		{"unix", "uid", []string{"want unix:uid:N"}},
		{"unix", "uid:", []string{"not a decimal number"}},
		{"unix", "uid:root", []string{"not a decimal number"}},
		{"unix", "uid:007", []string{"not a decimal number"}},
		{"unix", "uid:4294967296", []string{"not a decimal number"}},
		{"unix", "path:bin/envoy", []string{"absolute, clean path"}},
		{"unix", "path:/usr/bin/../bin/envoy", []string{"absolute, clean path"}},
		{"unix", "sha256:" + strings.ToUpper(digest), []string{"64 lowercase hex digits"}},
		{"unix", "sha256:" + digest[:63], []string{"64 lowercase hex digits"}},
	} {
		err := Builtin().CheckSelector(tt.typ, tt.value)
		if err == nil {
			t.Errorf("%s:%s accepted", tt.typ, tt.value)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s:%s: %q does not say %q", tt.typ, tt.value, err, w)
			}
		}
	}
}

// fixed is an attestor for the seam's own tests: it produces the kinds it
// is given, and the selectors (or the error) it is given.
type fixed struct {
	name  string
	kinds []Kind
	sels  []string
	err   error
}

func (f fixed) Name() string  { return f.name }
func (f fixed) Kinds() []Kind { return f.kinds }
func (f fixed) Attest(context.Context, PeerCred) ([]string, error) {
	return f.sels, f.err
}

func anyValue(string) error { return nil }

// A kind is produced once: two attestors claiming one kind, or a kind
// without a value check, is a Set that cannot be built.
func TestNewSetRefusesAmbiguousKinds(t *testing.T) {
	dup := fixed{name: "other", kinds: []Kind{{Type: "unix", Key: "uid", Check: anyValue}}}
	if _, err := NewSet(Unix{}, dup); err == nil || !strings.Contains(err.Error(), "unix:uid") || !strings.Contains(err.Error(), "other") {
		t.Fatalf("two attestors producing unix:uid: %v, want an error naming the kind and both", err)
	}
	for _, k := range []Kind{{Type: "x", Key: "y"}, {Type: "x:y", Key: "z", Check: anyValue}, {Type: "x", Check: anyValue}} {
		if _, err := NewSet(fixed{name: "bad", kinds: []Kind{k}}); err == nil {
			t.Errorf("kind %+v accepted", k)
		}
	}
}

// The table of kinds produced elsewhere only words a refusal: a Set with
// an attestor that produces k8s:ns accepts it, with that attestor's check.
func TestKindProducedOnceAnAttestorIsAdded(t *testing.T) {
	k8s := fixed{name: "k8s", kinds: []Kind{{Type: "k8s", Key: "ns", Value: "NS", Check: func(v string) error {
		if v == "" {
			return errors.New("empty namespace")
		}
		return nil
	}}}}
	s, err := NewSet(Unix{}, k8s)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CheckSelector("k8s", "ns:shop"); err != nil {
		t.Fatalf("k8s:ns:shop with a k8s attestor: %v", err)
	}
	if err := s.CheckSelector("k8s", "ns:"); err == nil || !strings.Contains(err.Error(), "empty namespace") {
		t.Fatalf("k8s:ns: with a k8s attestor: %v, want its own check's error", err)
	}
	if err := s.CheckSelector("k8s", "sa:db"); err == nil || !strings.Contains(err.Error(), "k8s workload attestor") {
		t.Fatalf("k8s:sa:db, which the added attestor does not produce: %v", err)
	}
	if by, _ := s.Producer("k8s:ns"); by != "k8s" {
		t.Fatalf("producer of k8s:ns = %q", by)
	}
}

// Set.Caller runs every attestor on the caller, in order, and checks the
// process after they have read it; an attestor's error refuses the
// caller, naming the attestor.
func TestSetCallerRunsEveryAttestor(t *testing.T) {
	c := connectChild(t)
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: c.pc})
	extra := fixed{name: "extra", kinds: []Kind{{Type: "x", Key: "k", Check: anyValue}}, sels: []string{"x:k:v"}}
	s, err := NewSet(Unix{}, extra)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Caller(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Selectors) < 3 || got.Selectors[0] != "unix:uid:"+strconv.Itoa(os.Getuid()) || got.Selectors[len(got.Selectors)-1] != "x:k:v" {
		t.Fatalf("selectors %q, want the unix ones then x:k:v", got.Selectors)
	}
	if got.Label != c.pc.String() || got.Check == nil || got.Check() != nil {
		t.Fatalf("caller %+v: want the peer's label and a passing Check", got)
	}

	failing := fixed{name: "broken", err: errors.New("cannot read cgroup")}
	s, err = NewSet(Unix{}, failing)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Caller(ctx); err == nil || !strings.Contains(err.Error(), "broken attestor") || !strings.Contains(err.Error(), "cannot read cgroup") {
		t.Fatalf("attestor failing: %v, %v; want an error naming it", got.Selectors, err)
	}

	// What was read by pid is checked after every attestor: once the
	// process has exited nobody's selectors come back.
	c.stop()
	s, _ = NewSet(Unix{}, extra)
	if got, err := s.Caller(ctx); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("exited caller: %v, %v; want ErrProcessGone", got.Selectors, err)
	}

	if _, err := s.Caller(context.Background()); !errors.Is(err, ErrNoPeerCred) {
		t.Fatalf("no peer: %v, want ErrNoPeerCred", err)
	}
}

// The unix attestor on a real process of another user: the kernel's uid
// and gid, its pid, and the path and digest of what it runs; every
// selector is of a kind the attestor declares and passes that kind's
// check, so an entry for it can be made.
func TestUnixAttestorOtherUser(t *testing.T) {
	c := connectChildAs(t, &syscall.Credential{Uid: 65534, Gid: 65534})
	got, err := Unix{}.Attest(context.Background(), c.pc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(c.exe)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	want := []string{
		"unix:uid:65534",
		"unix:gid:65534",
		"unix:pid:" + strconv.Itoa(c.cmd.Process.Pid),
		"unix:path:" + c.exe,
		"unix:sha256:" + hex.EncodeToString(sum[:]),
	}
	if !slices.Equal(got, want) {
		t.Fatalf("selectors %q, want %q", got, want)
	}
	for _, sel := range got {
		typ, value, _ := strings.Cut(sel, ":")
		key, _, _ := strings.Cut(value, ":")
		if by, ok := Builtin().Producer(typ + ":" + key); !ok || by != "unix" {
			t.Errorf("%s: kind not declared by the unix attestor", sel)
		}
		if err := Builtin().CheckSelector(typ, value); err != nil {
			t.Errorf("%s, as attested, is refused for entries: %v", sel, err)
		}
	}
}

// A connection whose process is not tracked (ReadPeerCred alone) is
// attested on uid and gid only: nothing read by pid.
func TestUnixAttestorUntracked(t *testing.T) {
	pc := PeerCred{UID: 1000, GID: 1001, PID: 42}
	got, err := Unix{}.Attest(context.Background(), pc)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"unix:uid:1000", "unix:gid:1001"}; !slices.Equal(got, want) {
		t.Fatalf("untracked selectors %q, want %q", got, want)
	}
}

// rechecking is an attestor whose answer stops holding when gone is set
// (a pod deleted while its process runs).
type rechecking struct {
	fixed
	gone *atomic.Bool
}

func (r rechecking) AttestRecheck(ctx context.Context, p PeerCred) ([]string, func() error, error) {
	sels, err := r.Attest(ctx, p)
	return sels, func() error {
		if r.gone.Load() {
			return errors.New("pod deleted")
		}
		return nil
	}, err
}

// A Rechecker's check joins the Caller's: the caller stops being served
// when its pod goes though its process runs on, and a gone process is
// still the reason once it has exited.
func TestSetCallerAddsRecheckersCheck(t *testing.T) {
	c := connectChild(t)
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: c.pc})
	var gone atomic.Bool
	r := rechecking{fixed: fixed{name: "pods", kinds: []Kind{{Type: "x", Key: "k", Check: anyValue}}, sels: []string{"x:k:v"}}, gone: &gone}
	s, err := NewSet(Unix{}, r)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Caller(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(got.Selectors, "x:k:v") || got.Recheck() != nil {
		t.Fatalf("caller %q, check %v: want x:k:v and a passing check", got.Selectors, got.Recheck())
	}
	gone.Store(true)
	if err := got.Recheck(); err == nil || err.Error() != "pod deleted" {
		t.Fatalf("after the pod went: %v, want its check's error", err)
	}
	c.stop()
	if err := got.Recheck(); !errors.Is(err, ErrProcessGone) {
		t.Fatalf("after the process exited: %v, want ErrProcessGone first", err)
	}
}
