package controlplane

import (
	"context"
	"crypto/x509"
	"errors"
	"math/big"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshid/meshid/store"
	"github.com/meshid/meshid/store/boltstore"
)

// sharedStore lets two servers use one store, as replicas on etcd will:
// each server closes its store on Close, so the test closes the real one.
type sharedStore struct{ store.Store }

func (sharedStore) Close() error { return nil }

// openReplica opens a server on st, with the KEK file every replica of
// the data shares.
func openReplica(t *testing.T, st store.Store, kekFile string) *Server {
	t.Helper()
	srv, err := Open(context.Background(), Config{DataDir: t.TempDir(), Store: sharedStore{st}, KEKFile: kekFile,
		SVIDTTL: time.Hour, CATTL: 48 * time.Hour, ShortPrepareWindow: true, CAPrepareWindow: time.Minute})
	if err != nil {
		t.Fatalf("open replica: %v", err)
	}
	return srv
}

// sharedBolt opens a bbolt store for replicas to share (closed when t
// ends) and names the KEK file they share.
func sharedBolt(t *testing.T) (*boltstore.Store, string) {
	t.Helper()
	dir := t.TempDir()
	bs, err := boltstore.Open(filepath.Join(dir, "meshid.db"), boltstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bs.Close() })
	return bs, filepath.Join(dir, "kek")
}

// servedCRLState parses the number of every CRL s publishes now and says
// whether one of them lists serial.
func servedCRLState(t *testing.T, s *Server, serial *big.Int) (numbers []*big.Int, listed bool) {
	t.Helper()
	s.pubMu.Lock()
	crls := s.crl.served.DER
	s.pubMu.Unlock()
	for _, der := range crls {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		numbers = append(numbers, rl.Number)
		for _, e := range rl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(serial) == 0 {
				listed = true
			}
		}
	}
	return numbers, listed
}

// TestReplicasShareOneStore: two servers on one store each see the
// other's writes through the watch, not only their own: entries, a CA
// rotation, a revocation (on the CRLs both publish, numbered from one
// counter). Only the leader takes lifecycle steps, and the other takes
// over when it goes.
func TestReplicasShareOneStore(t *testing.T) {
	ctx := context.Background()
	bs, kekFile := sharedBolt(t)
	a := openReplica(t, bs, kekFile)
	aClosed := false
	defer func() {
		if !aClosed {
			a.Close()
		}
	}()
	b := openReplica(t, bs, kekFile)
	defer b.Close()

	if !a.Leading() {
		t.Fatal("the first replica, which made the CA, does not lead")
	}
	if b.Leading() {
		t.Fatal("both replicas lead")
	}
	if _, idA := a.activeCA(); func() bool { _, idB := b.activeCA(); return idA != idB }() {
		t.Fatal("the second replica made a CA of its own")
	}

	// An entry written through A is matched by B once B is in sync.
	e, err := a.CreateEntry(ctx, EntrySpec{SpiffeID: "spiffe://cluster.local/ns/a/sa/web", Selectors: []store.Selector{{Type: "unix", Value: "uid:4242"}}}, "test")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.synced(ctx); err != nil {
		t.Fatal(err)
	}
	if got := b.MatchEntries([]string{"unix:uid:4242"}); len(got) != 1 || got[0].ID != e.ID {
		t.Fatalf("replica B matches %v, want the entry A created", got)
	}

	// The follower refuses lifecycle steps; the leader's reach B.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = b.PrepareCA(short, "test")
	cancel()
	var fp *FailedPreconditionError
	if !errors.As(err, &fp) {
		t.Fatalf("prepare on the follower: %v, want FailedPrecondition", err)
	}
	// A signs an SVID with the CA about to retire: B must keep that CA in
	// its bundle until it expires, though B signed nothing with it.
	if _, err := a.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/ns/a/sa/web", KeyType: "ec-p256", EntryID: e.ID, Requester: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.PrepareCA(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	next, err := a.ActivateCA(ctx, "test", true)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.synced(ctx); err != nil {
		t.Fatal(err)
	}
	if _, id := b.activeCA(); id != next.ID {
		t.Fatalf("replica B signs with %s, want %s activated through A", id, next.ID)
	}
	if n := len(b.BundleCerts()); n != 2 {
		t.Fatalf("replica B's bundle has %d CAs, want 2 (new, and the retired one an SVID signed through A still needs)", n)
	}

	// A certificate signed by B, revoked through A, is on B's CRLs.
	svid, err := b.MintX509SVID(ctx, MintRequest{SpiffeID: "spiffe://cluster.local/ns/a/sa/web", KeyType: "ec-p256", EntryID: e.ID, Requester: "test"})
	if err != nil {
		t.Fatal(err)
	}
	serial, ok := new(big.Int).SetString(svid.Serial, 16)
	if !ok {
		t.Fatalf("serial %q", svid.Serial)
	}
	before, listed := servedCRLState(t, b, serial)
	if listed {
		t.Fatal("listed before revocation")
	}
	if _, err := a.Revoke(ctx, "", svid.Serial, "test"); err != nil {
		t.Fatal(err)
	}
	if err := b.synced(ctx); err != nil {
		t.Fatal(err)
	}
	afterB, listed := servedCRLState(t, b, serial)
	if !listed {
		t.Fatal("replica B's CRLs do not list the serial revoked through A")
	}
	afterA, listedA := servedCRLState(t, a, serial)
	if !listedA {
		t.Fatal("replica A's CRLs do not list the serial it revoked")
	}
	if afterA[0].Cmp(afterB[0]) != 0 || afterB[0].Cmp(before[0]) <= 0 {
		t.Fatalf("CRL numbers: before %v, A %v, B %v; want A's and B's the same, above before", before[0], afterA[0], afterB[0])
	}
	// One set for both: the leader's bytes, so one bundle version.
	if va, vb := a.newestBundle(), b.newestBundle(); va != vb || va == "" {
		t.Fatalf("bundle versions after the revocation: A %s, B %s; want one", va, vb)
	}

	// A goes; B takes over the lifecycle.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	aClosed = true
	if _, err := b.PrepareCA(ctx, "test"); err != nil {
		t.Fatalf("prepare on B after A closed: %v", err)
	}
	if !b.Leading() {
		t.Fatal("B does not lead after A closed")
	}
}

// TestSingleUseTokenBindingIsInTheStore: the connection a single-use token
// is bound to is recorded in the store, so the binding holds on another
// replica (a proxy's connection may land on either) and across a restart,
// and any other connection is still refused.
func TestSingleUseTokenBindingIsInTheStore(t *testing.T) {
	ctx := context.Background()
	bs, kekFile := sharedBolt(t)
	a := openReplica(t, bs, kekFile)
	defer a.Close()
	b := openReplica(t, bs, kekFile)
	secret, _, err := a.CreateJoinToken(ctx, "spiffe://cluster.local/ns/edge/sa/proxy", time.Hour, true, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.RedeemJoinToken(ctx, secret, "conn-1"); err != nil {
		t.Fatal(err)
	}
	if id, err := b.RedeemJoinToken(ctx, secret, "conn-1"); err != nil || id.String() != "spiffe://cluster.local/ns/edge/sa/proxy" {
		t.Fatalf("the bound connection on the other replica: %v %v", id, err)
	}
	if _, err := b.RedeemJoinToken(ctx, secret, "conn-2"); !errors.Is(err, ErrBadToken) {
		t.Fatalf("another connection: %v, want ErrBadToken", err)
	}
	b.Close()
	b = openReplica(t, bs, kekFile) // a restart
	defer b.Close()
	if _, err := b.RedeemJoinToken(ctx, secret, "conn-1"); err != nil {
		t.Fatalf("the bound connection after a restart: %v", err)
	}
}
