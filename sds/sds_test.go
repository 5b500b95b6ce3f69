package sds_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/internal/fakeclock"
	"github.com/meshid/meshid/sds"
	"github.com/meshid/meshid/store"
)

func TestMain(m *testing.M) {
	if os.Getenv("MESHID_SDS_CHILD") != "" {
		os.Exit(childClient())
	}
	goleak.VerifyTestMain(m)
}

const (
	idA = "spiffe://cluster.local/ns/shop/sa/web"
	idB = "spiffe://cluster.local/ns/shop/sa/db"
)

type harness struct {
	srv    *controlplane.Server
	socket string
	listen controlplane.Listening
	stop   func()
}

// startServer runs a real server whose workload socket serves SDS, with an
// entry giving this test process (by pid) identity idA.
func startServer(t *testing.T, svidTTL time.Duration) *harness {
	t.Helper()
	return startServerDrain(t, svidTTL, 0)
}

// startServerDrain is startServer with the server's drain timeout (0: the
// default).
func startServerDrain(t *testing.T, svidTTL, drain time.Duration) *harness {
	t.Helper()
	return startServerConfig(t, controlplane.Config{SVIDTTL: svidTTL}, drain)
}

// startServerConfig is startServer with a whole server config (a fake
// clock, say); DataDir and a 24 h CA TTL are filled in.
func startServerConfig(t *testing.T, cfg controlplane.Config, drain time.Duration) *harness {
	t.Helper()
	cfg.DataDir = t.TempDir()
	if cfg.CATTL == 0 {
		cfg.CATTL = 24 * time.Hour
	}
	srv, err := controlplane.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "meshid-sds-")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{srv: srv, socket: filepath.Join(dir, "w.sock")}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- srv.Run(ctx, controlplane.Endpoints{
			AdminSocket: filepath.Join(dir, "a.sock"), Socket: h.socket,
			SDSListen: "127.0.0.1:0", SDSRESTListen: "127.0.0.1:0", DrainTimeout: drain,
		}, func(l controlplane.Listening) { h.listen = l; close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	stopped := false
	h.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		srv.Close()
		os.RemoveAll(dir)
	}
	t.Cleanup(h.stop)
	h.entry(t, idA, "unix:pid:"+strconv.Itoa(os.Getpid()))
	return h
}

func (h *harness) entry(t *testing.T, id, selector string) {
	t.Helper()
	sels, err := testSelectors(selector)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.CreateEntry(context.Background(), controlplane.EntrySpec{SpiffeID: id, Selectors: sels}, "test"); err != nil {
		t.Fatal(err)
	}
}

func tlsCert(t *testing.T, s *tlsv3.Secret) ([]*x509.Certificate, []byte) {
	t.Helper()
	tc := s.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %s is not a tls_certificate", s.GetName())
	}
	return parsePEMCerts(t, tc.GetCertificateChain().GetInlineBytes()), tc.GetPrivateKey().GetInlineBytes()
}

func trustedCA(t *testing.T, s *tlsv3.Secret) []*x509.Certificate {
	t.Helper()
	vc := s.GetValidationContext()
	if vc == nil {
		t.Fatalf("secret %s is not a validation_context", s.GetName())
	}
	return parsePEMCerts(t, vc.GetTrustedCa().GetInlineBytes())
}

// verifySVID checks what Envoy and its peers would: the key matches the
// leaf, and the chain verifies against the bundle as a SPIFFE X509-SVID.
func verifySVID(t *testing.T, chain []*x509.Certificate, keyPEM []byte, roots []*x509.Certificate) spiffeid.ID {
	t.Helper()
	return verifySVIDAt(t, time.Now(), chain, keyPEM, roots)
}

// verifySVIDAt is verifySVID at the time now (a fake clock's).
func verifySVIDAt(t *testing.T, now time.Time, chain []*x509.Certificate, keyPEM []byte, roots []*x509.Certificate) spiffeid.ID {
	t.Helper()
	chainPEM := make([]byte, 0)
	for _, c := range chain {
		chainPEM = append(chainPEM, pemCert(c)...)
	}
	if _, err := tls.X509KeyPair(chainPEM, keyPEM); err != nil {
		t.Fatalf("private key does not match the leaf: %v", err)
	}
	b := x509bundle.New(spiffeid.RequireTrustDomainFromString("cluster.local"))
	for _, r := range roots {
		b.AddX509Authority(r)
	}
	id, _, err := x509svid.Verify(chain, b, x509svid.WithTime(now))
	if err != nil {
		t.Fatalf("SVID does not verify against the bundle it came with: %v", err)
	}
	return id
}

func TestBothNamingConventions(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)

	// Istio's names, one stream each, as Envoy opens them.
	def := openSotW(t, c, "sidecar~10.0.0.1~web.shop~shop.svc.cluster.local", "default")
	root := openSotW(t, c, "sidecar~10.0.0.1~web.shop~shop.svc.cluster.local", "ROOTCA")
	dr := def.recv()
	rr := root.recv()
	def.ack(dr)
	root.ack(rr)
	chain, key := tlsCert(t, secrets(t, dr, "default")["default"])
	rootSecret := secrets(t, rr, "ROOTCA")["ROOTCA"]
	roots := trustedCA(t, rootSecret)
	// A CRL (empty until something is revoked) for every CA: Envoy needs
	// one per CA of a chain once any is configured.
	if crl := rootSecret.GetValidationContext().GetCrl().GetInlineBytes(); strings.Count(string(crl), "BEGIN X509 CRL") != len(roots) {
		t.Fatalf("ROOTCA carries %d CRLs for %d CAs", strings.Count(string(crl), "BEGIN X509 CRL"), len(roots))
	}
	if id := verifySVID(t, chain, key, roots); id.String() != idA {
		t.Fatalf("default SVID is %s, want the caller's %s", id, idA)
	}

	// SPIRE's names: the SPIFFE ID, the trust domain, ALL.
	byID := openSotW(t, c, "n", idA)
	td := openSotW(t, c, "n", "spiffe://cluster.local")
	all := openSotW(t, c, "n", "ALL")
	idChain, idKey := tlsCert(t, secrets(t, byID.recv(), idA)[idA])
	if idChain[0].SerialNumber.Cmp(chain[0].SerialNumber) != 0 {
		t.Fatal("the SPIFFE-ID name and default serve different SVIDs to the same caller")
	}
	tdRoots := trustedCA(t, secrets(t, td.recv(), "spiffe://cluster.local")["spiffe://cluster.local"])
	verifySVID(t, idChain, idKey, tdRoots)
	allSecret := secrets(t, all.recv(), "ALL")["ALL"]
	cv := allSecret.GetValidationContext().GetCustomValidatorConfig()
	if cv.GetName() != sds.SPIFFEValidatorName {
		t.Fatalf("ALL validator %q", cv.GetName())
	}
	var spiffeCfg tlsv3.SPIFFECertValidatorConfig
	if err := cv.GetTypedConfig().UnmarshalTo(&spiffeCfg); err != nil {
		t.Fatal(err)
	}
	if err := spiffeCfg.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	if len(spiffeCfg.GetTrustDomains()) != 1 || spiffeCfg.GetTrustDomains()[0].GetName() != "cluster.local" {
		t.Fatalf("ALL trust domains = %v", spiffeCfg.GetTrustDomains())
	}
	verifySVID(t, chain, key, parsePEMCerts(t, spiffeCfg.GetTrustDomains()[0].GetTrustBundle().GetInlineBytes()))

	// A second stream of the same caller gets the same current SVID.
	def2 := openSotW(t, c, "other-node-id", "default")
	chain2, _ := tlsCert(t, secrets(t, def2.recv(), "default")["default"])
	if chain2[0].SerialNumber.Cmp(chain[0].SerialNumber) != 0 {
		t.Fatal("a second stream of the same caller got a different SVID")
	}
}

// TestRenewalIsPushedBeforeExpiry: on the fake clock, the renewal is
// pushed on the open stream when the clock reaches the renewal point (half
// the SVID's life, ±10%), not before and not after.
func TestRenewalIsPushedBeforeExpiry(t *testing.T) {
	const ttl = time.Hour
	fc := fakeclock.New(time.Now())
	h := startServerConfig(t, controlplane.Config{SVIDTTL: ttl, Now: fc.Now, AfterFunc: fc.AfterFunc}, 0)
	c := dialSDS(t, h.socket)
	s := openSotW(t, c, "n", "default")
	first := s.recv()
	issued := fc.Now()
	s.ack(first)
	chain1, _ := tlsCert(t, secrets(t, first, "default")["default"])
	life := chain1[0].NotAfter.Sub(issued)
	// By the latest renewal point it has renewed; the next response on the
	// open stream is the renewal (nothing else changes).
	fc.Advance(life*55/100 + time.Second)
	second := s.recv()
	s.ack(second)
	chain2, key2 := tlsCert(t, secrets(t, second, "default")["default"])
	if chain2[0].SerialNumber.Cmp(chain1[0].SerialNumber) == 0 {
		t.Fatal("renewal pushed the same certificate")
	}
	// The renewed SVID was signed at the fake time of the renewal.
	renewedAt := chain2[0].NotAfter.Add(-ttl)
	if lo, hi := issued.Add(life*45/100-time.Second), issued.Add(life*55/100+time.Second); renewedAt.Before(lo) || renewedAt.After(hi) {
		t.Fatalf("renewed at +%s of a %s life, want between 45%% and 55%%", renewedAt.Sub(issued), life)
	}
	if second.GetVersionInfo() == first.GetVersionInfo() || second.GetNonce() == first.GetNonce() {
		t.Fatal("renewal reused version_info or nonce")
	}
	verifySVIDAt(t, fc.Now(), chain2, key2, h.srv.BundleCerts())
}

func TestBundleChangeIsPushedAndNACKDoesNotLoop(t *testing.T) {
	h := startServer(t, time.Hour)
	c := dialSDS(t, h.socket)
	root := openSotW(t, c, "n", "ROOTCA")
	first := root.recv()
	if n := len(trustedCA(t, secrets(t, first, "ROOTCA")["ROOTCA"])); n != 1 {
		t.Fatalf("bundle has %d CAs, want 1", n)
	}
	// NACK it. A server that re-sent the same content would make the next
	// response on this stream the 1-CA bundle again.
	root.nack(first, "Failed to load trusted CA certificates")
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	second := root.recv()
	if n := len(trustedCA(t, secrets(t, second, "ROOTCA")["ROOTCA"])); n != 2 {
		t.Fatalf("after a NACK and a CA prepare the next push has %d CAs, want the new 2-CA bundle (a re-send of the NACKed one means a loop)", n)
	}
	root.ack(second)
	// A stale nonce is ignored: a request naming an old nonce with a new
	// resource list must not be answered.
	root.send(&discoveryv3.DiscoveryRequest{Node: root.node, ResourceNames: []string{"ROOTCA", "ALL"}, TypeUrl: sds.SecretTypeURL, ResponseNonce: first.GetNonce()})
	// Activating changes no bundle content (no push); the next prepare does.
	if _, err := h.srv.ActivateCA(context.Background(), "test", true); err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	third := root.recv()
	got := secrets(t, third, "ROOTCA")
	if _, ok := got["ROOTCA"]; !ok || len(got) != 1 {
		t.Fatalf("after a stale-nonce request the stream changed its names: %v", got)
	}
	if n := len(trustedCA(t, got["ROOTCA"])); n != 3 {
		t.Fatalf("third push has %d CAs, want 3", n)
	}
}

func TestUnknownAndForbiddenNames(t *testing.T) {
	h := startServer(t, time.Hour)
	h.entry(t, idB, "unix:uid:65534") // someone else's identity
	c := dialSDS(t, h.socket)
	s := openSotW(t, c, "n", idB)
	// Nothing may come for idB. Then ask for more on the same stream (no
	// response yet, so no nonce): the first response must hold only ROOTCA.
	s.names = []string{idB, "no-such-secret", "spiffe://other.domain", "ROOTCA"}
	s.send(&discoveryv3.DiscoveryRequest{Node: s.node, ResourceNames: s.names, TypeUrl: sds.SecretTypeURL})
	r := s.recv()
	got := secrets(t, r, s.names...)
	if len(got) != 1 || got["ROOTCA"] == nil {
		t.Fatalf("forbidden or unknown names answered: %v", keys(got))
	}
	// And the stream stays up: it still gets pushes.
	s.ack(r)
	if _, err := h.srv.PrepareCA(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	if got := secrets(t, s.recv(), s.names...); len(got) != 1 || got["ROOTCA"] == nil {
		t.Fatalf("second push: %v", keys(got))
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestCallersSeeOnlyTheirOwn runs a second SDS client in a child process
// (another pid, hence another identity) and checks that each caller gets
// its own SVID as default and nothing for the other's SPIFFE ID, whatever
// node.id it claims.
func TestCallersSeeOnlyTheirOwn(t *testing.T) {
	h := startServer(t, time.Hour)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "MESHID_SDS_CHILD="+h.socket)
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
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	h.entry(t, idB, "unix:pid:"+strconv.Itoa(cmd.Process.Pid))
	fmt.Fprintln(stdin, "go")
	out, err := io.ReadAll(bufio.NewReader(stdout))
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v (%s)", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 || lines[0] != "default="+idB || lines[1] != "other=refused" {
		t.Fatalf("child saw %q; want its own %s and nothing of %s", lines, idB, idA)
	}

	// And this process, claiming the child's node id, still gets only A.
	c := dialSDS(t, h.socket)
	s := openSotW(t, c, "child-node", "default")
	chain, _ := tlsCert(t, secrets(t, s.recv(), "default")["default"])
	if chain[0].URIs[0].String() != idA {
		t.Fatalf("parent got %s", chain[0].URIs[0])
	}
	_, err = c.FetchSecrets(context.Background(), &discoveryv3.DiscoveryRequest{Node: envoyNode("child-node"), ResourceNames: []string{idB}, TypeUrl: sds.SecretTypeURL})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("fetching another caller's SVID: %v, want PermissionDenied", err)
	}
}

// childClient is the second caller: it waits for its entry, then reports
// what SDS gives it for "default" and for the parent's SPIFFE ID.
func childClient() int {
	socket := os.Getenv("MESHID_SDS_CHILD")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return 2
	}
	c, closeConn, err := childDial(socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer closeConn()
	ctx := context.Background()
	resp, err := c.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyNode("sidecar-parent"), ResourceNames: []string{"default"}, TypeUrl: sds.SecretTypeURL})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var sec tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&sec); err != nil {
		return 2
	}
	certs, err := parseChain(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if err != nil {
		return 2
	}
	fmt.Printf("default=%s\n", certs[0].URIs[0])
	_, err = c.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyNode("sidecar-parent"), ResourceNames: []string{idA}, TypeUrl: sds.SecretTypeURL})
	if status.Code(err) == codes.PermissionDenied {
		fmt.Println("other=refused")
	} else {
		fmt.Printf("other=%v\n", err)
	}
	return 0
}

// testSelectors parses one selector; a unix:pid one also gets the uid that
// owns the process, which the server requires beside a pid.
func testSelectors(selector string) ([]store.Selector, error) {
	if pid, ok := strings.CutPrefix(selector, "unix:pid:"); ok {
		n, err := strconv.Atoi(pid)
		if err != nil {
			return nil, err
		}
		return controlplane.PIDSelectors(n)
	}
	sel, err := controlplane.ParseSelector(selector)
	return []store.Selector{sel}, err
}
