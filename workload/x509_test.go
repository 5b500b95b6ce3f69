package workload_test

import (
	"context"
	"crypto/x509"
	"io"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

func sameCerts(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return x.Equal(y) })
}

// TestX509SourceGetsTheCallersSVID: go-spiffe's X509Source on the shared
// socket gets this process's SVID, which verifies against the bundle it
// came with; the raw response has the spec's encoding.
func TestX509SourceGetsTheCallersSVID(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	hint := h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := testCtx(t)

	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(h.clientOpts()))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID.String() != idA || svid.Hint != hint {
		t.Fatalf("SVID %s hint %q; want %s hint %q", svid.ID, svid.Hint, idA, hint)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, src); err != nil {
		t.Fatalf("SVID does not verify against the bundle it came with: %v", err)
	}
	b, err := src.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if !sameCerts(b.X509Authorities(), h.srv.BundleCerts()) {
		t.Fatal("bundle differs from the server's")
	}

	// The wire format, with a plain gRPC client.
	stream, err := h.raw(t).FetchX509SVID(withHeader(ctx), &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// One CRL per CA (empty until something is revoked).
	if len(resp.GetSvids()) != 1 || len(resp.GetCrl()) != 1 || len(resp.GetFederatedBundles()) != 0 {
		t.Fatalf("response: %d svids, %d crls, %d federated bundles", len(resp.GetSvids()), len(resp.GetCrl()), len(resp.GetFederatedBundles()))
	}
	if _, err := x509.ParseRevocationList(resp.GetCrl()[0]); err != nil {
		t.Fatalf("crl field: %v", err)
	}
	w := resp.GetSvids()[0]
	chain, err := x509.ParseCertificates(w.GetX509Svid())
	if err != nil {
		t.Fatalf("x509_svid is not concatenated DER: %v", err)
	}
	if !chain[0].Equal(svid.Certificates[0]) {
		t.Fatal("raw client and X509Source got different SVIDs")
	}
	if _, err := x509.ParsePKCS8PrivateKey(w.GetX509SvidKey()); err != nil {
		t.Fatalf("x509_svid_key is not PKCS#8 DER: %v", err)
	}
	roots, err := x509.ParseCertificates(w.GetBundle())
	if err != nil || !sameCerts(roots, h.srv.BundleCerts()) {
		t.Fatalf("bundle field: %v", err)
	}
	if w.GetSpiffeId() != idA || w.GetHint() != hint {
		t.Fatalf("spiffe_id %q hint %q", w.GetSpiffeId(), w.GetHint())
	}
}

// TestHeaderRequired: every RPC without "workload.spiffe.io: true" is
// InvalidArgument; go-spiffe's client (which sends it) works.
func TestHeaderRequired(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := testCtx(t)
	raw := h.raw(t)
	for _, tc := range []struct {
		name string
		ctx  context.Context
	}{
		{"no header", ctx},
		{"header false", metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "false")},
		{"header twice", metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true", "workload.spiffe.io", "true")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := map[string]func() error{
				"FetchX509SVID": func() error {
					s, err := raw.FetchX509SVID(tc.ctx, &pb.X509SVIDRequest{})
					if err == nil {
						_, err = s.Recv()
					}
					return err
				},
				"FetchX509Bundles": func() error {
					s, err := raw.FetchX509Bundles(tc.ctx, &pb.X509BundlesRequest{})
					if err == nil {
						_, err = s.Recv()
					}
					return err
				},
				"FetchJWTBundles": func() error {
					s, err := raw.FetchJWTBundles(tc.ctx, &pb.JWTBundlesRequest{})
					if err == nil {
						_, err = s.Recv()
					}
					return err
				},
				"FetchJWTSVID": func() error {
					_, err := raw.FetchJWTSVID(tc.ctx, &pb.JWTSVIDRequest{Audience: []string{"x"}})
					return err
				},
				"ValidateJWTSVID": func() error {
					_, err := raw.ValidateJWTSVID(tc.ctx, &pb.ValidateJWTSVIDRequest{Audience: "x", Svid: "a.b.c"})
					return err
				},
			}
			for name, call := range calls {
				if err := call(); status.Code(err) != codes.InvalidArgument {
					t.Errorf("%s: %v, want InvalidArgument", name, err)
				}
			}
		})
	}
	// The same RPC with the header answers.
	s, err := raw.FetchX509SVID(withHeader(ctx), &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatalf("with the header: %v", err)
	}
	if _, err := workloadapi.FetchX509SVID(ctx, h.clientOpts()); err != nil {
		t.Fatalf("go-spiffe client: %v", err)
	}
}

// TestCallerWithoutIdentity: no SVID means PermissionDenied for
// FetchX509SVID and FetchJWTSVID, but bundles are still served (to
// verifiers).
func TestCallerWithoutIdentity(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idB, "unix:uid:65534") // someone else's
	ctx := testCtx(t)
	c := h.client(t)
	if _, err := c.FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchX509SVID: %v, want PermissionDenied", err)
	}
	if _, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchJWTSVID: %v, want PermissionDenied", err)
	}
	bundles, err := c.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("FetchX509Bundles for a verifier: %v", err)
	}
	b, err := bundles.GetX509BundleForTrustDomain(td)
	if err != nil || !sameCerts(b.X509Authorities(), h.srv.BundleCerts()) {
		t.Fatalf("bundle: %v", err)
	}
	if bundles.Len() != 1 {
		t.Fatalf("%d bundles, want 1", bundles.Len())
	}
	jb, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles for a verifier: %v", err)
	}
	if _, err := jb.GetJWTBundleForTrustDomain(td); err != nil {
		t.Fatal(err)
	}
}

// TestSeveralSVIDsWithHints: every entry matching the caller gives an
// SVID with its own hint, and the entry added later arrives on the open
// stream.
func TestSeveralSVIDsWithHints(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	ctx := testCtx(t)
	hintA := h.entry(t, idA, pidSelector(os.Getpid()))
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(h.clientOpts()))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	hintC := h.entry(t, idC, pidSelector(os.Getpid()))
	hintB := h.entry(t, idB, "unix:uid:"+strconv.Itoa(os.Getuid()))
	want := map[string]string{idA: hintA, idB: hintB, idC: hintC}
	c := h.client(t)
	// The entries exist before this fetch, so all three are in its first
	// message.
	svids, err := c.FetchX509SVIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, s := range svids {
		got[s.ID.String()] = s.Hint
	}
	if len(svids) != 3 || len(got) != 3 {
		t.Fatalf("got %v, want all of %v", got, want)
	}
	for id, hint := range want {
		if got[id] != hint {
			t.Fatalf("%s has hint %q, want %q (the entry ID)", id, got[id], hint)
		}
	}
	// The open X509Source stream sees them too.
	for {
		if _, err := src.GetX509SVID(); err != nil {
			t.Fatal(err)
		}
		ctxs, err := c.FetchX509Context(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ctxs.SVIDs) == 3 {
			break
		}
		select {
		case <-src.Updated():
		case <-ctx.Done():
			t.Fatal("no update with every SVID")
		}
	}
}

// TestPushesAreCompleteAndNotRepeated: the X.509 stream is pushed each
// renewal; the bundles stream is not (nothing in it changed) and gets the
// next real bundle change.
func TestPushesAreCompleteAndNotRepeated(t *testing.T) {
	fc := fakeclock.New(time.Now())
	h := startServer(t, controlplane.Config{SVIDTTL: time.Hour, Now: fc.Now, AfterFunc: fc.AfterFunc})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := withHeader(testCtx(t))
	raw := h.raw(t)
	svids, err := raw.FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	bundles, err := raw.FetchX509Bundles(ctx, &pb.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := svids.Recv()
	if err != nil {
		t.Fatal(err)
	}
	b1, err := bundles.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if n := len(b1.GetBundles()); n != 1 || b1.GetBundles()[td.IDString()] == nil {
		t.Fatalf("bundles keyed %v, want only %s", keys(b1.GetBundles()), td.IDString())
	}
	// Past the latest renewal point (55% of the life): the renewal is the
	// next push.
	fc.Advance(time.Hour*55/100 + time.Second)
	second, err := svids.Recv() // the renewal
	if err != nil {
		t.Fatal(err)
	}
	if string(second.GetSvids()[0].GetX509Svid()) == string(first.GetSvids()[0].GetX509Svid()) {
		t.Fatal("renewal push repeated the same SVID")
	}
	if len(second.GetSvids()[0].GetBundle()) == 0 || len(second.GetSvids()[0].GetX509SvidKey()) == 0 {
		t.Fatal("renewal push is not a complete message")
	}
	// A renewal changed nothing on the bundle stream; the next message
	// there must be the new bundle, not a repeat of the old one.
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	b2, err := bundles.Recv()
	if err != nil {
		t.Fatal(err)
	}
	roots, err := x509.ParseCertificates(b2.GetBundles()[td.IDString()])
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 2 {
		t.Fatalf("bundle push after a CA prepare has %d CAs, want 2 (a repeat of the old bundle?)", len(roots))
	}
	// And the X.509 stream carries the new bundle with the SVID.
	for {
		r, err := svids.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got, err := x509.ParseCertificates(r.GetSvids()[0].GetBundle())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) == 2 {
			break
		}
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestShutdownEndsStreams: Shutdown ends open streams with status OK so a
// graceful stop does not wait on them.
func TestShutdownEndsStreams(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := withHeader(testCtx(t))
	s, err := h.raw(t).FetchX509SVID(ctx, &pb.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	h.wl.Shutdown()
	if _, err := s.Recv(); err != io.EOF {
		t.Fatalf("after Shutdown: %v, want the stream to end with status OK (EOF)", err)
	}
}

// TestMTLSBetweenTwoIdentities: two workloads (this process and a child,
// told apart by pid) complete TLS 1.3 mTLS over 127.0.0.1 with SVIDs from
// go-spiffe X509Sources; a third identity, not authorised, is refused.
func TestMTLSBetweenTwoIdentities(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idA, pidSelector(os.Getpid()))
	h.entry(t, idC, pidSelector(os.Getpid())) // a second identity of this process
	ch := startChild(t, h, idB, idA)
	ctx := testCtx(t)
	pick := func(id string) workloadapi.X509SourceOption {
		return workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, s := range svids {
				if s.ID.String() == id {
					return s
				}
			}
			return svids[0]
		})
	}
	srcA, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(h.clientOpts()), pick(idA))
	if err != nil {
		t.Fatal(err)
	}
	defer srcA.Close()
	if s, _ := srcA.GetX509SVID(); s.ID.String() != idA {
		t.Fatalf("source A presents %s", s.ID)
	}
	peer, line, err := handshake(ctx, ch.addr, srcA, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idB)))
	if err != nil {
		t.Fatalf("A -> B mTLS: %v", err)
	}
	if id, _ := x509svid.IDFromCert(peer); id.String() != idB || line != "hello "+idA {
		t.Fatalf("peer %s said %q; want %s saying hello to %s", id, line, idB, idA)
	}

	// A client that expects someone else refuses B.
	if _, _, err := handshake(ctx, ch.addr, srcA, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idC))); err == nil {
		t.Fatal("client accepted B while authorising only C")
	}

	// The third identity, C, is valid in the trust domain but B does not
	// authorise it: refused.
	srcC, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(h.clientOpts()), pick(idC))
	if err != nil {
		t.Fatal(err)
	}
	defer srcC.Close()
	if s, _ := srcC.GetX509SVID(); s.ID.String() != idC {
		t.Fatalf("source C presents %s", s.ID)
	}
	if _, line, err := handshake(ctx, ch.addr, srcC, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idB))); err == nil {
		t.Fatalf("B accepted C (said %q)", line)
	}
	// And A still gets in.
	if _, _, err := handshake(ctx, ch.addr, srcA, tlsconfig.AuthorizeID(spiffeid.RequireFromString(idB))); err != nil {
		t.Fatalf("A -> B after C was refused: %v", err)
	}
}

// TestRenewalSeenBeforeExpiry: with 4 s SVIDs both sides renew; this
// process's X509Source sees its renewed SVID before the old one expires,
// and mTLS handshakes succeed throughout, with the peer's renewed
// certificate too.
func TestRenewalSeenBeforeExpiry(t *testing.T) {
	h := startServer(t, controlplane.Config{SVIDTTL: 4 * time.Second})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ch := startChild(t, h, idB, idA)
	ctx := testCtx(t)
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(h.clientOpts()))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	first, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	authz := tlsconfig.AuthorizeID(spiffeid.RequireFromString(idB))
	peer0, _, err := handshake(ctx, ch.addr, src, authz)
	if err != nil {
		t.Fatal(err)
	}
	var ownRenewed, peerRenewed bool
	handshakes := 1
	tick := time.NewTicker(100 * time.Millisecond) // handshake cadence, not synchronisation
	defer tick.Stop()
	for !ownRenewed || !peerRenewed {
		select {
		case <-src.Updated():
			cur, err := src.GetX509SVID()
			if err != nil {
				t.Fatal(err)
			}
			if cur.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 && !ownRenewed {
				ownRenewed = true
				if now := time.Now(); !now.Before(first.Certificates[0].NotAfter) {
					t.Fatalf("renewed SVID seen at %s, after the old one expired at %s", now, first.Certificates[0].NotAfter)
				}
				if _, _, err := x509svid.Verify(cur.Certificates, src); err != nil {
					t.Fatalf("renewed SVID does not verify: %v", err)
				}
			}
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("no renewal seen (own %v, peer %v)", ownRenewed, peerRenewed)
		}
		peer, line, err := handshake(ctx, ch.addr, src, authz)
		if err != nil {
			t.Fatalf("handshake %d failed during renewal: %v", handshakes+1, err)
		}
		if line != "hello "+idA {
			t.Fatalf("peer said %q", line)
		}
		handshakes++
		if peer.SerialNumber.Cmp(peer0.SerialNumber) != 0 {
			peerRenewed = true
		}
	}
	t.Logf("%d handshakes across renewals of both sides", handshakes)
}

func mustID(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }
