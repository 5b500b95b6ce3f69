package helper_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/meshid/meshid/controlplane"
	"github.com/meshid/meshid/helper"
)

// TestOnceWritesCRLsJWTSVIDAndShowsReloadOutput: besides the SVID, the
// helper writes the CRLs the Workload API sends (crl.pem, listing a
// revoked serial and signed by a CA of bundle.pem), with --jwt-audience a
// JWT-SVID that validates against the JWT bundle it writes beside it, and
// it logs what the reload command printed.
func TestOnceWritesCRLsJWTSVIDAndShowsReloadOutput(t *testing.T) {
	srv, socket := startServer(t, time.Hour, true)
	other, err := srv.MintX509SVID(context.Background(), controlplane.MintRequest{SpiffeID: "spiffe://cluster.local/ns/shop/sa/db", Requester: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Revoke(context.Background(), "", other.Serial, "test"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var logs bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	err = helper.Run(ctx, helper.Config{Socket: socket, Dir: dir, Once: true, JWTAudience: []string{"db.shop"},
		ReloadCmd: "echo nginx: configuration test is successful", Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, dir)

	bundle, err := x509bundle.Load(td, filepath.Join(dir, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	crlPEM, err := os.ReadFile(filepath.Join(dir, "crl.pem"))
	if err != nil {
		t.Fatalf("crl.pem: %v", err)
	}
	listed := false
	for rest := crlPEM; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		if blk.Type != "X509 CRL" {
			t.Fatalf("crl.pem holds a %q block", blk.Type)
		}
		crl, err := x509.ParseRevocationList(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		signed := false
		for _, ca := range bundle.X509Authorities() {
			signed = signed || crl.CheckSignatureFrom(ca) == nil
		}
		if !signed {
			t.Fatal("a CRL in crl.pem is not signed by a CA of bundle.pem")
		}
		for _, e := range crl.RevokedCertificateEntries {
			listed = listed || strings.EqualFold(e.SerialNumber.Text(16), strings.TrimLeft(other.Serial, "0"))
		}
	}
	if !listed {
		t.Fatalf("crl.pem does not list the revoked serial %s", other.Serial)
	}

	jb, err := jwtbundle.Load(td, filepath.Join(dir, "jwt_bundle.json"))
	if err != nil {
		t.Fatalf("jwt_bundle.json: %v", err)
	}
	tok, err := os.ReadFile(filepath.Join(dir, "jwt_svid.token"))
	if err != nil {
		t.Fatalf("jwt_svid.token: %v", err)
	}
	svid, err := jwtsvid.ParseAndValidate(string(tok), jb, []string{"db.shop"})
	if err != nil || svid.ID.String() != idA {
		t.Fatalf("jwt_svid.token does not validate against jwt_bundle.json: %v %v", svid, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "jwt_svid.token")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("jwt_svid.token mode: %v %v, want 600", fi.Mode().Perm(), err)
	}
	if !strings.Contains(logs.String(), "configuration test is successful") {
		t.Fatalf("the reload command's output is not in the log:\n%s", logs.String())
	}
}
