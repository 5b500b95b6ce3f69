package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/sds"
)

// sdsDial opens a gRPC client connection to the workload socket. The
// client side shares its write buffers and keeps small read buffers so
// that ten thousand connections in the load process stay cheap; the
// server's own settings are untouched.
func sdsDial(path string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(4096),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
}

// envoyNode is what Envoy puts in the node field of every request.
func envoyNode(id string) *corev3.Node {
	return &corev3.Node{
		Id:                   id,
		Cluster:              "meshid-bench",
		UserAgentName:        "envoy",
		UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: "1.36.0"},
	}
}

// isBundleName reports whether name is served as a trust bundle (and so
// changes when a CA is prepared).
func isBundleName(name string) bool {
	switch name {
	case sds.NameRootCA, sds.NameAll:
		return true
	case sds.NameDefault:
		return false
	}
	rest, ok := strings.CutPrefix(name, "spiffe://")
	return ok && !strings.Contains(rest, "/")
}

var pemCertHeader = []byte("-----BEGIN CERTIFICATE-----")

// certCount counts the certificates a secret carries (SVID chain or
// bundle), and checks it is the one asked for.
func decodeSecret(r *discoveryv3.DiscoveryResponse, want string) (int, error) {
	if r.GetTypeUrl() != sds.SecretTypeURL {
		return 0, fmt.Errorf("response type_url %q", r.GetTypeUrl())
	}
	if r.GetNonce() == "" || r.GetVersionInfo() == "" {
		return 0, errors.New("response without nonce or version_info")
	}
	if len(r.GetResources()) != 1 {
		return 0, fmt.Errorf("%d resources for one name", len(r.GetResources()))
	}
	var s tlsv3.Secret
	if err := r.GetResources()[0].UnmarshalTo(&s); err != nil {
		return 0, fmt.Errorf("decode secret: %w", err)
	}
	if s.GetName() != want {
		return 0, fmt.Errorf("secret %q on the stream for %q", s.GetName(), want)
	}
	switch t := s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		return bytes.Count(t.TlsCertificate.GetCertificateChain().GetInlineBytes(), pemCertHeader), nil
	case *tlsv3.Secret_ValidationContext:
		vc := t.ValidationContext
		if ca := vc.GetTrustedCa(); ca != nil {
			return bytes.Count(ca.GetInlineBytes(), pemCertHeader), nil
		}
		if tc := vc.GetCustomValidatorConfig().GetTypedConfig(); tc != nil {
			return len(tc.GetValue()), nil // SPIFFE validator: size stands in for content
		}
	}
	return 0, nil
}
