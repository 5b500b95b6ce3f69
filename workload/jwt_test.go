package workload_test

import (
	"encoding/base64"
	"os"
	"strings"
	"testing"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/controlplane"
)

// TestJWTSVIDFetchAndValidate: a JWT-SVID fetched with go-spiffe's
// JWTSource validates through ValidateJWTSVID and locally against the JWT
// bundle; wrong audience and tampered tokens are rejected both ways.
func TestJWTSVIDFetchAndValidate(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	hint := h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := testCtx(t)
	src, err := workloadapi.NewJWTSource(ctx, workloadapi.WithClientOptions(h.clientOpts()))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	svid, err := src.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db", ExtraAudiences: []string{"cache"}})
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID.String() != idA || svid.Hint != hint {
		t.Fatalf("JWT-SVID for %s hint %q", svid.ID, svid.Hint)
	}
	if life := time.Until(svid.Expiry); life <= 0 || life > 5*time.Minute+time.Second {
		t.Fatalf("JWT-SVID lives %s, want at most 5m", life)
	}
	token := svid.Marshal()

	// Locally, with the JWT bundle from the Workload API.
	if _, err := jwtsvid.ParseAndValidate(token, src, []string{"db"}); err != nil {
		t.Fatalf("local validation: %v", err)
	}
	// Through the API.
	c := h.client(t)
	got, err := c.ValidateJWTSVID(ctx, token, "cache")
	if err != nil {
		t.Fatalf("ValidateJWTSVID: %v", err)
	}
	if got.ID.String() != idA || got.Claims["sub"] != idA {
		t.Fatalf("validated %s, claims %v", got.ID, got.Claims)
	}
	if _, ok := got.Claims["exp"]; !ok {
		t.Fatalf("claims lack exp: %v", got.Claims)
	}

	// Wrong audience.
	if _, err := c.ValidateJWTSVID(ctx, token, "other"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("wrong audience via API: %v, want InvalidArgument", err)
	}
	if _, err := jwtsvid.ParseAndValidate(token, src, []string{"other"}); err == nil {
		t.Fatal("wrong audience accepted locally")
	}
	// Tampered: the subject changed to another identity, the signature
	// kept.
	parts := strings.Split(token, ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	forged := strings.Replace(string(payload), idA, idB, 1)
	if forged == string(payload) {
		t.Fatalf("payload %s lacks the subject", payload)
	}
	tampered := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(forged)) + "." + parts[2]
	if _, err := jwtsvid.ParseInsecure(tampered, []string{"db"}); err != nil {
		t.Fatalf("the forged token should parse (only its signature is wrong): %v", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, tampered, "db"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("tampered token via API: %v, want InvalidArgument", err)
	}
	if _, err := jwtsvid.ParseAndValidate(tampered, src, []string{"db"}); err == nil {
		t.Fatal("tampered token accepted locally")
	}

	// Required fields.
	raw := h.raw(t)
	if _, err := raw.FetchJWTSVID(withHeader(ctx), &pb.JWTSVIDRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID without audience: %v", err)
	}
	if _, err := raw.ValidateJWTSVID(withHeader(ctx), &pb.ValidateJWTSVIDRequest{Svid: token}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID without audience: %v", err)
	}
	if _, err := raw.ValidateJWTSVID(withHeader(ctx), &pb.ValidateJWTSVIDRequest{Audience: "db"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID without svid: %v", err)
	}
	// An ID the caller does not hold.
	if _, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db", Subject: mustID(idB)}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("JWT-SVID for another's ID: %v, want PermissionDenied", err)
	}
}

// TestJWTSVIDPerIdentity: with several identities, one JWT-SVID each
// (hint = entry ID) unless one is asked for by ID.
func TestJWTSVIDPerIdentity(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	hintA := h.entry(t, idA, pidSelector(os.Getpid()))
	hintC := h.entry(t, idC, pidSelector(os.Getpid()))
	ctx := testCtx(t)
	c := h.client(t)
	all, err := c.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, s := range all {
		got[s.ID.String()] = s.Hint
	}
	if len(all) != 2 || got[idA] != hintA || got[idC] != hintC {
		t.Fatalf("got %v", got)
	}
	one, err := c.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "db", Subject: mustID(idC)})
	if err != nil {
		t.Fatal(err)
	}
	if len(one) != 1 || one[0].ID.String() != idC {
		t.Fatalf("asked for %s, got %d SVIDs", idC, len(one))
	}
}

// TestExpiredJWTSVIDRejected: a token minted by a server whose clock runs
// 15 minutes behind is already expired (5 minute life) when it is
// validated.
func TestExpiredJWTSVIDRejected(t *testing.T) {
	h := startServer(t, controlplane.Config{Now: func() time.Time { return time.Now().Add(-15 * time.Minute) }})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := testCtx(t)
	c := h.client(t)
	raw := h.raw(t)
	resp, err := raw.FetchJWTSVID(withHeader(ctx), &pb.JWTSVIDRequest{Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	token := resp.GetSvids()[0].GetSvid()
	if _, err := c.ValidateJWTSVID(ctx, token, "db"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("expired token via API: %v, want InvalidArgument", err)
	}
	bundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(token, bundles, []string{"db"}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired token locally: %v", err)
	}
}

// TestBundleSource: go-spiffe's BundleSource (X.509 context and JWT
// bundles together) gets the trust domain's X.509 and JWT authorities.
func TestBundleSource(t *testing.T) {
	h := startServer(t, controlplane.Config{})
	h.entry(t, idA, pidSelector(os.Getpid()))
	ctx := testCtx(t)
	bs, err := workloadapi.NewBundleSource(ctx, workloadapi.WithClientOptions(h.clientOpts()))
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	b, err := bs.GetBundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	if !sameCerts(b.X509Authorities(), h.srv.BundleCerts()) {
		t.Fatal("X.509 authorities differ from the server's bundle")
	}
	if len(b.JWTAuthorities()) == 0 {
		t.Fatal("no JWT authorities")
	}
	for kid := range b.JWTAuthorities() {
		if kid == "" {
			t.Fatal("JWT authority without kid")
		}
	}
}
