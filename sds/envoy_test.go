package sds_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"net"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/sds"
)

// envoyNode is what Envoy puts in every request's node field.
func envoyNode(id string) *corev3.Node {
	return &corev3.Node{
		Id:                   id,
		Cluster:              "test-cluster",
		UserAgentName:        "envoy",
		UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: "1.36.0"},
	}
}

func dialSDS(t *testing.T, socket string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

// sotw is one StreamSecrets stream driven the way Envoy's GrpcMuxImpl
// drives it: a first request with node and names, then an ACK (version and
// nonce of the response) or a NACK (previous version, the response's nonce,
// error_detail) for every response.
type sotw struct {
	t        *testing.T
	stream   grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	names    []string
	node     *corev3.Node
	accepted string // last ACKed version
	cancel   context.CancelFunc
	resps    chan *discoveryv3.DiscoveryResponse
	errs     chan error
}

func openSotW(t *testing.T, c secretv3.SecretDiscoveryServiceClient, nodeID string, names ...string) *sotw {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := c.StreamSecrets(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	s := &sotw{t: t, stream: st, names: names, node: envoyNode(nodeID), cancel: cancel,
		resps: make(chan *discoveryv3.DiscoveryResponse, 16), errs: make(chan error, 1)}
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				s.errs <- err
				return
			}
			s.resps <- r
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-s.errs
	})
	s.send(&discoveryv3.DiscoveryRequest{Node: s.node, ResourceNames: names, TypeUrl: sds.SecretTypeURL})
	return s
}

func (s *sotw) send(r *discoveryv3.DiscoveryRequest) {
	s.t.Helper()
	if err := s.stream.Send(r); err != nil {
		s.t.Fatalf("send: %v", err)
	}
}

// recv waits for the next response; the deadline only bounds a broken run.
func (s *sotw) recv() *discoveryv3.DiscoveryResponse {
	s.t.Helper()
	select {
	case r := <-s.resps:
		return r
	case err := <-s.errs:
		s.t.Fatalf("stream ended: %v", err)
	case <-time.After(30 * time.Second):
		s.t.Fatal("no SDS response within 30s")
	}
	return nil
}

func (s *sotw) ack(r *discoveryv3.DiscoveryResponse) {
	s.accepted = r.GetVersionInfo()
	s.send(&discoveryv3.DiscoveryRequest{Node: s.node, ResourceNames: s.names, TypeUrl: sds.SecretTypeURL,
		VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()})
}

func (s *sotw) nack(r *discoveryv3.DiscoveryResponse, msg string) {
	s.send(&discoveryv3.DiscoveryRequest{Node: s.node, ResourceNames: s.names, TypeUrl: sds.SecretTypeURL,
		VersionInfo: s.accepted, ResponseNonce: r.GetNonce(), ErrorDetail: &statuspb.Status{Code: 13, Message: msg}})
}

// secrets decodes a response's resources by name, checking what Envoy checks:
// the type URL and that every Secret.name was asked for.
func secrets(t *testing.T, r *discoveryv3.DiscoveryResponse, asked ...string) map[string]*tlsv3.Secret {
	t.Helper()
	if r.GetTypeUrl() != sds.SecretTypeURL {
		t.Fatalf("response type_url %q", r.GetTypeUrl())
	}
	if r.GetNonce() == "" || r.GetVersionInfo() == "" {
		t.Fatal("response without nonce or version")
	}
	out := map[string]*tlsv3.Secret{}
	for _, a := range r.GetResources() {
		if a.GetTypeUrl() != sds.SecretTypeURL {
			t.Fatalf("resource type_url %q", a.GetTypeUrl())
		}
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		if err := s.ValidateAll(); err != nil {
			t.Fatalf("secret %s fails Envoy's proto validation: %v", s.GetName(), err)
		}
		found := false
		for _, n := range asked {
			found = found || n == s.GetName()
		}
		if !found {
			t.Fatalf("got secret %q, asked only for %v", s.GetName(), asked)
		}
		out[s.GetName()] = &s
	}
	return out
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
		if blk.Type != "CERTIFICATE" {
			continue // CRLs travel in the same PEM (SPIFFE validator bundles)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatal("no certificates in PEM")
	}
	return out
}
