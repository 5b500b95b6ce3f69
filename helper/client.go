package helper

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	pb "github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// workloadClient speaks the Workload API's generated gRPC directly rather
// than through go-spiffe's workloadapi.Client, whose X509Context drops
// the CRLs the response carries; the helper writes those too.
type workloadClient struct {
	conn *grpc.ClientConn
	api  pb.SpiffeWorkloadAPIClient
}

func dialWorkloadAPI(addr string) (*workloadClient, error) {
	path, ok := strings.CutPrefix(addr, "unix://")
	if !ok {
		path, ok = strings.CutPrefix(addr, "unix:")
	}
	if !ok || path == "" {
		return nil, fmt.Errorf("workload api address %q: want a unix socket", addr)
	}
	conn, err := grpc.NewClient("passthrough:///workload-api", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}))
	if err != nil {
		return nil, fmt.Errorf("workload api client for %s: %w", addr, err)
	}
	return &workloadClient{conn: conn, api: pb.NewSpiffeWorkloadAPIClient(conn)}, nil
}

func (c *workloadClient) close() { c.conn.Close() }

// withHeader adds the security header every Workload API call must carry.
func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

// fetchX509 returns the first X.509-SVID response, waiting for the server
// (wait-for-ready) as go-spiffe's client does.
func (c *workloadClient) fetchX509(ctx context.Context) (*pb.X509SVIDResponse, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.api.FetchX509SVID(withHeader(ctx), &pb.X509SVIDRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return nil, err
	}
	return st.Recv()
}

// Backoff between watch attempts: quick for a server restart, bounded so
// a long outage does not hammer the socket.
const (
	minBackoff = 500 * time.Millisecond
	maxBackoff = 30 * time.Second
)

// watchX509 calls onUpdate with every response until ctx ends, re-opening
// the stream with backoff after each failure (reported to onError). It
// returns ctx's error.
func (c *workloadClient) watchX509(ctx context.Context, onUpdate func(*pb.X509SVIDResponse), onError func(error, time.Duration)) error {
	backoff := minBackoff
	for {
		got, err := c.watchOnce(ctx, onUpdate)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if got {
			backoff = minBackoff
		}
		if err == nil {
			err = errors.New("stream ended")
		}
		onError(err, backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// watchOnce runs one stream; got says whether it delivered anything.
func (c *workloadClient) watchOnce(ctx context.Context, onUpdate func(*pb.X509SVIDResponse)) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.api.FetchX509SVID(withHeader(ctx), &pb.X509SVIDRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return false, err
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return got, err
		}
		got = true
		onUpdate(resp)
	}
}

// fetchJWT returns a JWT-SVID of the caller's default identity for the
// audiences, and the JWT bundle (JWKS) of its trust domain.
func (c *workloadClient) fetchJWT(ctx context.Context, audience []string) (*pb.JWTSVID, []byte, error) {
	resp, err := c.api.FetchJWTSVID(withHeader(ctx), &pb.JWTSVIDRequest{Audience: audience}, grpc.WaitForReady(true))
	if err != nil {
		return nil, nil, fmt.Errorf("fetch JWT-SVID: %w", err)
	}
	if len(resp.GetSvids()) == 0 {
		return nil, nil, errors.New("fetch JWT-SVID: the Workload API sent none")
	}
	svid := resp.GetSvids()[0]
	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.api.FetchJWTBundles(withHeader(bctx), &pb.JWTBundlesRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return nil, nil, fmt.Errorf("fetch JWT bundles: %w", err)
	}
	bundles, err := st.Recv()
	if err != nil {
		return nil, nil, fmt.Errorf("fetch JWT bundles: %w", err)
	}
	id, err := spiffeid.FromString(svid.GetSpiffeId())
	if err != nil {
		return nil, nil, fmt.Errorf("JWT-SVID for %q: %w", svid.GetSpiffeId(), err)
	}
	td := id.TrustDomain().IDString()
	jwks, ok := bundles.GetBundles()[td]
	if !ok {
		return nil, nil, fmt.Errorf("no JWT bundle for %s", td)
	}
	return svid, jwks, nil
}
