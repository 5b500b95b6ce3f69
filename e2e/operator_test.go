package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"sigs.k8s.io/yaml"
)

// oneLineError checks a failed command: exit 1 and one line on stderr.
func oneLineError(t *testing.T, args []string, stdout, stderr string, code int) {
	t.Helper()
	if code != 1 || !strings.HasPrefix(stderr, "meshid: ") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line", args, code, stderr)
	}
	if strings.Contains(stdout, "PRIVATE KEY") {
		t.Errorf("%v printed a private key on failure", args)
	}
}

// TestOperatorCLI covers what a new operator trips over, against meshid dev
// in a subprocess: -o yaml, --log-format json, unknown subcommands, long
// durations, x509 mint never printing a key unasked, the SPIFFE bundle
// document with JWT keys, and the README's ca prepare / ca activate step.
func TestOperatorCLI(t *testing.T) {
	sock := filepath.Join(sockDir(t), "admin.sock")
	wsock := filepath.Join(filepath.Dir(sock), "w.sock")
	me := "spiffe://cluster.local/ns/dev/sa/me"
	dev := startMeshid(t, "dev", "--admin-socket", sock, "--socket", wsock, "--svid-ttl", "1h", "--spiffe-id", me, "--log-format", "json")
	dev.waitFor(t, "entry created")
	admin := "--admin-socket=" + sock

	// --log-format json: every log line is one JSON object.
	for _, l := range strings.Split(strings.TrimSpace(dev.output()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec["msg"] == nil {
			t.Fatalf("--log-format json wrote a line that is not a JSON record: %q (%v)", l, err)
		}
	}

	// Unknown subcommands of a group: exit 1 with a suggestion, not help and 0.
	for _, tc := range []struct {
		args    []string
		suggest string
	}{
		{[]string{"ca", "actvate", admin}, `did you mean "activate"`},
		{[]string{"entry", "bogus", admin}, ""},
		{[]string{"x509", "mnt"}, `did you mean "mint"`},
		{[]string{"entyr", "list"}, "Did you mean this? entry"},
	} {
		out, errOut, code := runCLI(t, tc.args...)
		oneLineError(t, tc.args, out, errOut, code)
		if !strings.Contains(errOut, "unknown command") || !strings.Contains(errOut, tc.suggest) {
			t.Errorf("%v: stderr %q, want an unknown command error with %q", tc.args, errOut, tc.suggest)
		}
	}

	// -o yaml is the -o json document as YAML, for every structured command.
	for _, args := range [][]string{
		{"entry", "list", admin},
		{"ca", "show", admin},
		{"certs", "list", admin},
		{"version", admin},
	} {
		js, errOut, code := runCLI(t, append(args, "-o", "json")...)
		if code != 0 {
			t.Fatalf("%v -o json: %s", args, errOut)
		}
		ym, errOut, code := runCLI(t, append(args, "-o", "yaml")...)
		if code != 0 {
			t.Fatalf("%v -o yaml: %s", args, errOut)
		}
		fromYAML, err := yaml.YAMLToJSON([]byte(ym))
		if err != nil {
			t.Fatalf("%v -o yaml is not YAML: %v\n%s", args, err, ym)
		}
		var a, b any
		if err := json.Unmarshal([]byte(js), &a); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(fromYAML, &b); err != nil {
			t.Fatal(err)
		}
		if y := strings.TrimSpace(ym); y != "[]" && (strings.HasPrefix(y, "{") || strings.HasPrefix(y, "[")) {
			t.Errorf("%v -o yaml printed JSON:\n%s", args, ym)
		}
		aj, _ := json.Marshal(a)
		bj, _ := json.Marshal(b)
		if string(aj) != string(bj) {
			t.Errorf("%v: -o yaml and -o json differ:\n%s\n%s", args, aj, bj)
		}
	}

	// Durations in days, weeks and years, and combined.
	for _, d := range []string{"1w", "1y", "1d12h", "0.5d", "90m"} {
		if _, errOut, code := runCLI(t, "certs", "list", admin, "--expiring-within", d); code != 0 {
			t.Errorf("--expiring-within %s: %s", d, errOut)
		}
	}
	certs := filepath.Join(t.TempDir(), "certs")
	if _, errOut, code := runCLI(t, "x509", "mint", admin, "--spiffe-id", me, "--ttl", "1d12h", "--out-dir", certs); code != 0 {
		t.Fatalf("x509 mint --ttl 1d12h: %s", errOut)
	}
	svid, err := x509svid.Load(filepath.Join(certs, "svid.pem"), filepath.Join(certs, "svid.key"))
	if err != nil {
		t.Fatal(err)
	}
	if life := svid.Certificates[0].NotAfter.Sub(svid.Certificates[0].NotBefore); life < 36*time.Hour-time.Minute || life > 36*time.Hour+2*time.Minute {
		t.Errorf("--ttl 1d12h minted an SVID living %s", life)
	}

	// x509 mint: no key on stdout unless asked; -o json is JSON.
	for _, args := range [][]string{
		{"x509", "mint", admin, "--spiffe-id", me},
		{"x509", "mint", admin, "--spiffe-id", me, "-o", "json"},
	} {
		out, errOut, code := runCLI(t, args...)
		oneLineError(t, args, out, errOut, code)
		if !strings.Contains(errOut, "--print-key") {
			t.Errorf("%v: %q does not say how to get the key", args, errOut)
		}
	}
	out, errOut, code := runCLI(t, "x509", "mint", admin, "--spiffe-id", me, "-o", "json", "--print-key")
	var doc struct {
		SpiffeID string `json:"spiffe_id"`
		SVIDPEM  string `json:"svid_pem"`
		KeyPEM   string `json:"key_pem"`
	}
	if err := json.Unmarshal([]byte(out), &doc); code != 0 || err != nil {
		t.Fatalf("x509 mint -o json --print-key: not JSON (%v, %s):\n%s", err, errOut, out)
	}
	if _, err := x509svid.Parse([]byte(doc.SVIDPEM), []byte(doc.KeyPEM)); err != nil || doc.SpiffeID != me {
		t.Fatalf("x509 mint -o json --print-key: svid_pem + key_pem do not load: %v", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	csrFile := filepath.Join(t.TempDir(), "req.csr")
	if err := os.WriteFile(csrFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, code = runCLI(t, "x509", "mint", admin, "--spiffe-id", me, "-o", "yaml", "--csr", csrFile)
	if code != 0 || strings.Contains(out, "key_pem") || !strings.Contains(out, "svid_pem:") {
		t.Fatalf("x509 mint --csr -o yaml (%s):\n%s", errOut, out)
	}

	// bundle show --format jwks: the SPIFFE bundle document with the JWT
	// keys, which validate a real JWT-SVID from the Workload API.
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	bundleDoc := func() *spiffebundle.Bundle {
		t.Helper()
		out, errOut, code := runCLI(t, "bundle", "show", admin, "--format", "jwks")
		if code != 0 {
			t.Fatalf("bundle show --format jwks: %s", errOut)
		}
		sb, err := spiffebundle.Parse(td, []byte(out))
		if err != nil {
			t.Fatalf("bundle show --format jwks is not a SPIFFE bundle: %v\n%s", err, out)
		}
		var raw struct {
			Keys []struct {
				Use string `json:"use"`
				Kid string `json:"kid"`
			} `json:"keys"`
		}
		if err := json.Unmarshal([]byte(out), &raw); err != nil {
			t.Fatal(err)
		}
		for _, k := range raw.Keys {
			if k.Use == "jwt-svid" && k.Kid == "" {
				t.Fatalf("a jwt-svid key without kid:\n%s", out)
			}
		}
		return sb
	}
	sb := bundleDoc()
	if len(sb.X509Authorities()) == 0 || len(sb.JWTAuthorities()) == 0 {
		t.Fatalf("bundle has %d x509-svid and %d jwt-svid keys, want both", len(sb.X509Authorities()), len(sb.JWTAuthorities()))
	}
	if hint, ok := sb.RefreshHint(); !ok || hint <= 0 {
		t.Fatalf("bundle without spiffe_refresh_hint (%v %v)", hint, ok)
	}
	seq1, ok := sb.SequenceNumber()
	if !ok || seq1 == 0 {
		t.Fatalf("bundle without spiffe_sequence (%v %v)", seq1, ok)
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	tok, err := workloadapi.FetchJWTSVID(wctx, jwtsvid.Params{Audience: "db.shop"}, workloadapi.WithAddr("unix://"+wsock))
	if err != nil {
		t.Fatal(err)
	}
	if v, err := jwtsvid.ParseAndValidate(tok.Marshal(), sb, []string{"db.shop"}); err != nil || v.ID.String() != me {
		t.Fatalf("a JWT-SVID from the Workload API does not validate against bundle show --format jwks: %v", err)
	}

	// meshid dev's publication window is short: the README's prepare then
	// activate works within seconds, and the bundle's sequence moves on.
	if _, errOut, code := runCLI(t, "ca", "prepare", admin); code != 0 {
		t.Fatalf("ca prepare: %s", errOut)
	}
	if seq2, _ := bundleDoc().SequenceNumber(); seq2 <= seq1 {
		t.Errorf("spiffe_sequence %d after ca prepare, want more than %d", seq2, seq1)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, errOut, code := runCLI(t, "ca", "activate", admin)
		if code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ca activate in meshid dev still refused after 30s: %s", errOut)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
