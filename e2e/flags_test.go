package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/ca"
)

// flagServer is a `meshid server` subprocess started for one flag's case.
type flagServer struct {
	dir, admin, socket string
	serving            string // the "msg=serving" log line
}

// addr returns the value of key in the serving line (e.g. sds_tcp).
func (s flagServer) addr(t *testing.T, key string) string {
	t.Helper()
	m := regexp.MustCompile(`\b` + key + `=(\S+)`).FindStringSubmatch(s.serving)
	if m == nil || m[1] == `""` {
		t.Fatalf("serving line has no %s: %s", key, s.serving)
	}
	return m[1]
}

// entryForMe gives the test's own uid the identity id.
func (s flagServer) entryForMe(t *testing.T, id string) {
	t.Helper()
	if _, stderr, code := runCLI(t, "entry", "create", "--admin-socket", s.admin, "--spiffe-id", id,
		"--selector", "unix:uid:"+strconv.Itoa(os.Getuid())); code != 0 {
		t.Fatalf("entry create: %s", stderr)
	}
}

// holdConns opens n raw connections to a unix socket and keeps them open
// until the test ends.
func holdConns(t *testing.T, socket string, n int) {
	t.Helper()
	for range n {
		c, err := net.Dial("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
}

// waitMetric polls /metrics until a line is exactly want.
func (s flagServer) waitMetric(t *testing.T, want string) {
	t.Helper()
	url := "http://" + s.addr(t, "metrics") + "/metrics"
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if slices.Contains(strings.Split(string(body), "\n"), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in /metrics after 20s", want)
		}
		time.Sleep(50 * time.Millisecond) // polling a condition
	}
}

// mint runs `meshid x509 mint` for id and returns the leaf and the rest of
// the chain as written to --out-dir.
func (s flagServer) mint(t *testing.T, id string) (leaf *x509.Certificate, chain []*x509.Certificate) {
	t.Helper()
	out := filepath.Join(s.dir, "mint")
	if _, stderr, code := runCLI(t, "x509", "mint", "--admin-socket", s.admin, "--spiffe-id", id, "--out-dir", out); code != 0 {
		t.Fatalf("x509 mint %s: %s", id, stderr)
	}
	certs := readPEMCerts(t, filepath.Join(out, "svid.pem"))
	return certs[0], certs[1:]
}

// bundle returns the trust bundle as `meshid bundle show` prints it.
func (s flagServer) bundle(t *testing.T) []*x509.Certificate {
	t.Helper()
	stdout, stderr, code := runCLI(t, "bundle", "show", "--admin-socket", s.admin)
	if code != 0 {
		t.Fatalf("bundle show: %s", stderr)
	}
	return parsePEMCerts(t, []byte(stdout))
}

func readPEMCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return parsePEMCerts(t, b)
}

func parsePEMCerts(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatal("no PEM certificates")
	}
	return out
}

func near(got, want, slack time.Duration) bool { return got >= want-slack && got <= want+slack }

// TestServerFlagsReachBehaviour runs the real binary once per server flag
// that changes what is issued or served, and checks the effect through the
// CLI and the served APIs. Package tests build controlplane.Config directly,
// so a flag that is parsed but never reaches the config passes them; this
// table is what catches it (it caught --upstream-ca-cert being ignored).
func TestServerFlagsReachBehaviour(t *testing.T) {
	upDir := t.TempDir()
	root, err := ca.NewRoot(spiffeid.RequireTrustDomainFromString("cluster.local"), ca.KeyP256, 10*365*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := ca.EncodeKeyPEM(root.Key)
	if err != nil {
		t.Fatal(err)
	}
	upCert, upKey := filepath.Join(upDir, "root.pem"), filepath.Join(upDir, "root.key")
	if err := os.WriteFile(upCert, ca.EncodeCertsPEM(root.Cert.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(upKey, rootKey, 0o600); err != nil {
		t.Fatal(err)
	}
	const web = "spiffe://cluster.local/ns/shop/sa/web"

	cases := []struct {
		name  string
		args  func(dir string) []string
		ready string // the serving line to wait for, if not the text format's
		check func(t *testing.T, s flagServer)
	}{
		{
			name: "trust-domain",
			args: func(string) []string { return []string{"--trust-domain", "example.org"} },
			check: func(t *testing.T, s flagServer) {
				leaf, _ := s.mint(t, "spiffe://example.org/ns/a/sa/b")
				if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://example.org/ns/a/sa/b" {
					t.Fatalf("SVID URIs %v", leaf.URIs)
				}
				b := s.bundle(t)
				if len(b[0].URIs) != 1 || b[0].URIs[0].String() != "spiffe://example.org" {
					t.Fatalf("CA URI SAN %v, want spiffe://example.org", b[0].URIs)
				}
			},
		},
		{
			name: "svid-ttl",
			args: func(string) []string { return []string{"--svid-ttl", "2h"} },
			check: func(t *testing.T, s flagServer) {
				leaf, _ := s.mint(t, web)
				if d := time.Until(leaf.NotAfter); !near(d, 2*time.Hour, 2*time.Minute) {
					t.Fatalf("SVID lives %v more, want ~2h", d)
				}
			},
		},
		{
			name: "ca-ttl",
			args: func(string) []string { return []string{"--ca-ttl", "30d"} },
			check: func(t *testing.T, s flagServer) {
				b := s.bundle(t)
				if d := time.Until(b[0].NotAfter); !near(d, 30*24*time.Hour, time.Hour) {
					t.Fatalf("CA lives %v more, want ~30d", d)
				}
			},
		},
		{
			name: "ca-key-type",
			args: func(string) []string { return []string{"--ca-key-type", "ec-p384"} },
			check: func(t *testing.T, s flagServer) {
				pub, ok := s.bundle(t)[0].PublicKey.(*ecdsa.PublicKey)
				if !ok || pub.Curve != elliptic.P384() {
					t.Fatalf("CA key %T, want ECDSA P-384", s.bundle(t)[0].PublicKey)
				}
			},
		},
		{
			name: "upstream-ca",
			args: func(string) []string { return []string{"--upstream-ca-cert", upCert, "--upstream-ca-key", upKey} },
			check: func(t *testing.T, s flagServer) {
				b := s.bundle(t)
				if len(b) != 1 || !b[0].Equal(root.Cert) {
					t.Fatalf("bundle is not exactly the upstream root (%d certs, subject %s)", len(b), b[0].Subject)
				}
				leaf, chain := s.mint(t, web)
				if len(chain) != 1 || !chain[0].IsCA || !bytes.Equal(chain[0].RawIssuer, root.Cert.RawSubject) {
					t.Fatalf("served chain does not carry meshid's intermediate under the root: %d certs", len(chain))
				}
				pool := x509.NewCertPool()
				pool.AddCert(root.Cert)
				inter := x509.NewCertPool()
				inter.AddCert(chain[0])
				if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
					t.Fatalf("SVID does not chain to the upstream root: %v", err)
				}
			},
		},
		{
			// A prepare point just after start: the successor must appear in
			// the bundle within seconds, where the default (0.5 of a year)
			// would prepare nothing.
			name: "ca-prepare-at",
			args: func(string) []string { return []string{"--ca-prepare-at", "0.0000001"} },
			check: func(t *testing.T, s flagServer) {
				deadline := time.Now().Add(20 * time.Second)
				for {
					stdout, stderr, code := runCLI(t, "ca", "show", "--admin-socket", s.admin, "-o", "json")
					if code != 0 {
						t.Fatalf("ca show: %s", stderr)
					}
					if strings.Contains(stdout, "PREPARED") || strings.Contains(stdout, "prepared") {
						return
					}
					if time.Now().After(deadline) {
						t.Fatalf("no prepared CA 20s after start with --ca-prepare-at near 0:\n%s", stdout)
					}
					time.Sleep(100 * time.Millisecond) // polling a condition, not synchronising
				}
			},
		},
		{
			name: "kek-file",
			args: func(dir string) []string { return []string{"--kek-file", filepath.Join(dir, "elsewhere", "kek")} },
			check: func(t *testing.T, s flagServer) {
				fi, err := os.Stat(filepath.Join(s.dir, "elsewhere", "kek"))
				if err != nil {
					t.Fatalf("no KEK at --kek-file: %v", err)
				}
				if fi.Mode().Perm() != 0o600 {
					t.Fatalf("KEK mode %v, want 0600", fi.Mode().Perm())
				}
				if _, err := os.Stat(filepath.Join(s.dir, "data", "kek")); err == nil {
					t.Fatal("a KEK was also made in the data dir")
				}
			},
		},
		{
			name: "jwt-ttl",
			args: func(string) []string { return []string{"--jwt-ttl", "90s"} },
			check: func(t *testing.T, s flagServer) {
				s.entryForMe(t, web)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "flags-test"}, workloadapi.WithAddr("unix://"+s.socket))
				if err != nil {
					t.Fatal(err)
				}
				if d := time.Until(svid.Expiry); !near(d, 90*time.Second, 30*time.Second) {
					t.Fatalf("JWT-SVID lives %v more, want ~90s", d)
				}
			},
		},
		{
			name: "sds-listen+server-dns",
			args: func(string) []string {
				return []string{"--sds-listen", "127.0.0.1:0", "--server-dns", "sds.mesh.example"}
			},
			check: func(t *testing.T, s flagServer) {
				assertServerDNS(t, s.addr(t, "sds_tcp"), "sds.mesh.example")
			},
		},
		{
			name: "sds-rest-listen",
			args: func(string) []string {
				return []string{"--sds-rest-listen", "127.0.0.1:0", "--server-dns", "rest.mesh.example"}
			},
			check: func(t *testing.T, s flagServer) {
				assertServerDNS(t, s.addr(t, "sds_rest"), "rest.mesh.example")
			},
		},
		{
			name: "crl-validity",
			args: func(string) []string { return []string{"--crl-validity", "50h"} },
			check: func(t *testing.T, s flagServer) {
				s.entryForMe(t, web)
				out := filepath.Join(s.dir, "helper")
				if _, stderr, code := runCLI(t, "helper", "--socket", s.socket, "--dir", out, "--once"); code != 0 {
					t.Fatalf("helper --once: %s", stderr)
				}
				b, err := os.ReadFile(filepath.Join(out, "crl.pem"))
				if err != nil {
					t.Fatal(err)
				}
				blk, _ := pem.Decode(b)
				if blk == nil {
					t.Fatal("crl.pem holds no PEM block")
				}
				crl, err := x509.ParseRevocationList(blk.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				if d := time.Until(crl.NextUpdate); !near(d, 50*time.Hour, 2*time.Minute) {
					t.Fatalf("CRL nextUpdate in %v, want ~50h", d)
				}
			},
		},
		{
			name: "max-crl-serials",
			args: func(string) []string { return []string{"--max-crl-serials", "1"} },
			check: func(t *testing.T, s flagServer) {
				first, _ := s.mint(t, web)
				second, _ := s.mint(t, web)
				if _, stderr, code := runCLI(t, "revoke", "--admin-socket", s.admin, "--serial", first.SerialNumber.Text(16)); code != 0 {
					t.Fatalf("first revoke: %s", stderr)
				}
				_, stderr, code := runCLI(t, "revoke", "--admin-socket", s.admin, "--serial", second.SerialNumber.Text(16))
				if code != 1 || !strings.Contains(stderr, "rotate --now") {
					t.Fatalf("revoke past --max-crl-serials 1: exit %d: %s", code, stderr)
				}
			},
		},
		{
			name: "max-connections-per-uid",
			args: func(string) []string {
				return []string{"--max-connections-per-uid", "2", "--metrics-listen", "127.0.0.1:0"}
			},
			check: func(t *testing.T, s flagServer) {
				holdConns(t, s.socket, 3)
				s.waitMetric(t, `meshid_connections_refused_total{listener="workload",reason="uid_limit"} 1`)
			},
		},
		{
			name: "max-connections",
			args: func(string) []string {
				return []string{"--max-connections", "2", "--max-connections-per-uid", "-1", "--metrics-listen", "127.0.0.1:0"}
			},
			check: func(t *testing.T, s flagServer) {
				holdConns(t, s.socket, 3)
				s.waitMetric(t, `meshid_connections_refused_total{listener="workload",reason="listener_limit"} 1`)
			},
		},
		{
			name:  "log-format",
			args:  func(string) []string { return []string{"--log-format", "json"} },
			ready: `"msg":"serving"`,
			check: func(t *testing.T, s flagServer) {
				var rec map[string]any
				if err := json.Unmarshal([]byte(s.serving), &rec); err != nil || rec["level"] != "INFO" {
					t.Fatalf("serving line is not a JSON record (%v): %s", err, s.serving)
				}
			},
		},
		{
			name: "metrics-listen",
			args: func(string) []string { return []string{"--metrics-listen", "127.0.0.1:0"} },
			check: func(t *testing.T, s flagServer) {
				resp, err := http.Get("http://" + s.addr(t, "metrics") + "/metrics")
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				body, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "meshid_") {
					t.Fatalf("/metrics: %d, no meshid_ series", resp.StatusCode)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			sd := sockDir(t)
			s := flagServer{dir: dir, admin: filepath.Join(sd, "admin.sock"), socket: filepath.Join(sd, "w.sock")}
			args := append([]string{"server", "--data-dir", filepath.Join(dir, "data"),
				"--admin-socket", s.admin, "--socket", s.socket}, tc.args(dir)...)
			p := startMeshid(t, args...)
			ready := tc.ready
			if ready == "" {
				ready = "msg=serving"
			}
			s.serving = p.waitLine(t, ready)
			tc.check(t, s)
		})
	}
}

// assertServerDNS dials a TLS endpoint and checks the DNS SANs of the
// certificate the server presents.
func assertServerDNS(t *testing.T, addr, want string) {
	t.Helper()
	var got []string
	cfg := &tls.Config{
		InsecureSkipVerify: true, // only the presented names are under test
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			c, err := x509.ParseCertificate(raw[0])
			if err == nil {
				got = c.DNSNames
			}
			return err
		},
		NextProtos: []string{"h2"},
	}
	conn, err := tls.Dial("tcp", addr, cfg)
	if conn != nil {
		conn.Close()
	}
	if got == nil {
		t.Fatalf("no server certificate from %s: %v", addr, err)
	}
	if !slices.Contains(got, want) {
		t.Fatalf("server certificate DNS names %v, want %s", got, want)
	}
}
