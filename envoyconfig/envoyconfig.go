// Package envoyconfig writes Envoy v3 bootstraps for sidecars that take their
// certificates from meshid over SDS.
//
// A bootstrap is built as go-control-plane protos, validated with the
// protoc-gen-validate rules Envoy itself applies (ValidateAll, on the
// bootstrap and on every typed_config inside it), and only then rendered as
// YAML. The rendered YAML is parsed back strictly and compared with the proto,
// so what is printed is exactly what was validated.
//
// The generated sidecar has:
//
//   - an SDS cluster (meshid_sds): HTTP/2 on meshid's unix socket;
//   - an inbound mTLS listener that requires a client certificate, presents
//     the SDS secret "default" and validates peers with "ROOTCA" (or, with
//     the SPIFFE validator, "ALL"), and forwards plain TCP to the local app;
//   - per upstream, an outbound plain-TCP listener on 127.0.0.1 and an mTLS
//     cluster that presents "default" and accepts only the upstream's SPIFFE
//     ID (URI SAN, exact match) signed by the trust bundle.
package envoyconfig

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Names of the secrets meshid's SDS server answers (see sds/ and DESIGN.md).
const (
	SecretDefault = "default" // the caller's own X.509-SVID
	SecretRootCA  = "ROOTCA"  // the caller's trust-domain bundle as trusted_ca
	SecretAll     = "ALL"     // every bundle, for the SPIFFE cert validator
)

// Fixed names inside the generated bootstrap.
const (
	SDSCluster      = "meshid_sds"
	LocalAppCluster = "local_app"
	InboundListener = "inbound"
	// FirstOutboundPort is where automatic outbound ports start.
	FirstOutboundPort = 15001
)

// Validation selects how peers' certificates are checked.
type Validation string

const (
	// ValidationDefault checks peers against the trust bundle in the
	// "ROOTCA" secret (trusted_ca), the convention Istio uses.
	ValidationDefault Validation = "default"
	// ValidationSPIFFE uses Envoy's SPIFFE certificate validator with every
	// trust domain's bundle from the "ALL" secret (SPIRE's convention), so a
	// CA can only vouch for IDs in its own trust domain.
	ValidationSPIFFE Validation = "spiffe"
)

// Defaults for Options' optional fields.
const (
	DefaultListen      = "0.0.0.0:15006"
	DefaultLocalApp    = "127.0.0.1:8080"
	DefaultAdmin       = "127.0.0.1:15000"
	DefaultNodeCluster = "meshid"
)

// Options describe one sidecar. Empty Listen, LocalApp, NodeID, NodeCluster
// and Validation take their defaults; an empty Admin means no admin listener
// (the CLI's --admin defaults to DefaultAdmin).
type Options struct {
	SpiffeID    string   // the sidecar's own SPIFFE ID (required)
	Socket      string   // meshid's workload socket (required)
	Upstreams   []string // "spiffe://td/path=host:port[@localport]"
	Listen      string   // inbound mTLS listener, ip:port
	LocalApp    string   // the app behind the sidecar, host:port
	NodeID      string   // default: derived from the SPIFFE ID's path
	NodeCluster string
	Admin       string // admin listener, ip:port; "" for none
	Validation  Validation
}

// Upstream is one parsed --upstream.
type Upstream struct {
	ID        spiffeid.ID
	Host      string
	Port      uint32
	LocalPort uint32 // 0 = assign automatically
}

// ParseUpstream parses "spiffe://td/path=host:port[@localport]".
func ParseUpstream(s string) (Upstream, error) {
	idStr, target, ok := strings.Cut(s, "=")
	if !ok {
		return Upstream{}, fmt.Errorf("upstream %q: want SPIFFE-ID=host:port[@localport]", s)
	}
	id, err := workloadID(idStr)
	if err != nil {
		return Upstream{}, fmt.Errorf("upstream %q: %w", s, err)
	}
	u := Upstream{ID: id}
	if hp, lp, ok := strings.Cut(target, "@"); ok {
		p, err := parsePort(lp)
		if err != nil {
			return Upstream{}, fmt.Errorf("upstream %q: local port: %w", s, err)
		}
		u.LocalPort, target = p, hp
	}
	if u.Host, u.Port, err = splitHostPort(target); err != nil {
		return Upstream{}, fmt.Errorf("upstream %q: %w", s, err)
	}
	return u, nil
}

// workloadID parses a SPIFFE ID that names a workload: it must have a path,
// since a bare trust domain is never an SVID's identity.
func workloadID(s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("invalid SPIFFE ID %q: %w", s, err)
	}
	if id.Path() == "" {
		return spiffeid.ID{}, fmt.Errorf("SPIFFE ID %q names a trust domain, not a workload", s)
	}
	return id, nil
}

func parsePort(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid port %q (want 1-65535)", s)
	}
	return uint32(n), nil
}

func splitHostPort(s string) (string, uint32, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("invalid address %q (want host:port)", s)
	}
	if host == "" {
		return "", 0, fmt.Errorf("invalid address %q: empty host", s)
	}
	port, err := parsePort(portStr)
	if err != nil {
		return "", 0, fmt.Errorf("invalid address %q: %w", s, err)
	}
	return host, port, nil
}

// splitIPPort is splitHostPort for addresses Envoy binds, which must be IPs.
func splitIPPort(s string) (string, uint32, error) {
	host, port, err := splitHostPort(s)
	if err != nil {
		return "", 0, err
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return "", 0, fmt.Errorf("invalid address %q: %q is not an IP address", s, host)
	}
	return host, port, nil
}

// NodeName derives a node ID from a SPIFFE ID's path: "sa.ns" for
// Kubernetes-style IDs (/ns/<ns>/sa/<sa>), otherwise the path's segments
// joined with ".".
func NodeName(id spiffeid.ID) string {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" {
		return segs[3] + "." + segs[1]
	}
	return strings.Join(segs, ".")
}

// plan is Options checked and resolved.
type plan struct {
	id          spiffeid.ID
	socket      string
	listenIP    string
	listenPort  uint32
	appHost     string
	appPort     uint32
	nodeID      string
	nodeCluster string
	adminIP     string
	adminPort   uint32 // 0 = no admin
	validation  Validation
	upstreams   []Upstream // LocalPort resolved
}

func (o Options) plan() (*plan, error) {
	if o.SpiffeID == "" {
		return nil, errors.New("--spiffe-id is required")
	}
	id, err := workloadID(o.SpiffeID)
	if err != nil {
		return nil, fmt.Errorf("--spiffe-id: %w", err)
	}
	p := &plan{id: id, socket: o.Socket, nodeID: o.NodeID, nodeCluster: o.NodeCluster, validation: o.Validation}
	if strings.TrimSpace(p.socket) == "" {
		return nil, errors.New("--socket must not be empty")
	}
	if p.nodeID == "" {
		p.nodeID = NodeName(id)
	}
	if p.nodeCluster == "" {
		p.nodeCluster = DefaultNodeCluster
	}
	switch p.validation {
	case "":
		p.validation = ValidationDefault
	case ValidationDefault, ValidationSPIFFE:
	default:
		return nil, fmt.Errorf("unknown --validation %q (want default or spiffe)", o.Validation)
	}
	if p.listenIP, p.listenPort, err = splitIPPort(or(o.Listen, DefaultListen)); err != nil {
		return nil, fmt.Errorf("--listen: %w", err)
	}
	if p.appHost, p.appPort, err = splitHostPort(or(o.LocalApp, DefaultLocalApp)); err != nil {
		return nil, fmt.Errorf("--local-app: %w", err)
	}
	// Ports this Envoy binds: outbound listeners must not collide with them
	// or with each other (checked by port alone, whatever the IP, so an
	// inbound 0.0.0.0:15006 and an outbound 127.0.0.1:15006 cannot clash).
	used := map[uint32]string{p.listenPort: "--listen"}
	if o.Admin != "" {
		if p.adminIP, p.adminPort, err = splitIPPort(o.Admin); err != nil {
			return nil, fmt.Errorf("--admin: %w", err)
		}
		if prev, ok := used[p.adminPort]; ok {
			return nil, fmt.Errorf("--admin port %d is already used by %s", p.adminPort, prev)
		}
		used[p.adminPort] = "--admin"
	}
	for _, s := range o.Upstreams {
		u, err := ParseUpstream(s)
		if err != nil {
			return nil, fmt.Errorf("--%w", err) // "--upstream "...": reason"
		}
		if u.LocalPort != 0 {
			if prev, ok := used[u.LocalPort]; ok {
				return nil, fmt.Errorf("--upstream %q: local port %d is already used by %s", s, u.LocalPort, prev)
			}
			used[u.LocalPort] = fmt.Sprintf("--upstream %q", s)
		}
		p.upstreams = append(p.upstreams, u)
	}
	next := uint32(FirstOutboundPort)
	for i := range p.upstreams {
		if p.upstreams[i].LocalPort != 0 {
			continue
		}
		for used[next] != "" {
			next++
		}
		if next > 65535 {
			return nil, errors.New("--upstream: no free local port left")
		}
		p.upstreams[i].LocalPort = next
		used[next] = "an automatic outbound port"
	}
	return p, nil
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Build returns the validated bootstrap for o.
func Build(o Options) (*bootstrapv3.Bootstrap, error) {
	p, err := o.plan()
	if err != nil {
		return nil, err
	}
	return p.build()
}

func (p *plan) build() (*bootstrapv3.Bootstrap, error) {
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{Id: p.nodeID, Cluster: p.nodeCluster},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Clusters: []*clusterv3.Cluster{sdsCluster(p.socket)},
		},
	}
	if p.adminPort != 0 {
		b.Admin = &bootstrapv3.Admin{Address: socketAddress(p.adminIP, p.adminPort)}
	}
	sr := b.StaticResources
	validationName := SecretRootCA
	if p.validation == ValidationSPIFFE {
		validationName = SecretAll
	}

	// Inbound: mTLS in, plain TCP to the app.
	down := &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext:         commonTLS(validationName, nil),
	}
	inbound, err := tcpListener(InboundListener, p.listenIP, p.listenPort, LocalAppCluster, down)
	if err != nil {
		return nil, err
	}
	sr.Listeners = append(sr.Listeners, inbound)
	sr.Clusters = append(sr.Clusters, plainCluster(LocalAppCluster, p.appHost, p.appPort, time.Second))

	// Outbound: plain TCP in on 127.0.0.1, mTLS to the upstream, which must
	// present exactly the SPIFFE ID it was named by.
	for _, u := range p.upstreams {
		// No dots: Envoy's stats split names at dots, so a dotted cluster
		// name would be cut apart when Envoy extracts the cluster_name tag.
		name := fmt.Sprintf("outbound_%d_%s", u.LocalPort, strings.ReplaceAll(NodeName(u.ID), ".", "_"))
		up := &tlsv3.UpstreamTlsContext{CommonTlsContext: commonTLS(validationName, &u.ID)}
		c := plainCluster(name, u.Host, u.Port, 5*time.Second)
		ts, err := transportSocket(up)
		if err != nil {
			return nil, err
		}
		c.TransportSocket = ts
		sr.Clusters = append(sr.Clusters, c)
		l, err := tcpListener(name, "127.0.0.1", u.LocalPort, name, nil)
		if err != nil {
			return nil, err
		}
		sr.Listeners = append(sr.Listeners, l)
	}

	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("generated bootstrap is invalid: %w", err)
	}
	return b, nil
}

// SDSConfigSource is the config source of every SDS secret. All secrets use
// the byte-identical source, as Envoy keys its SDS subscriptions by source and
// name.
func SDSConfigSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		// 0s: no initial-fetch deadline. With Envoy's default (15 s) a
		// listener or cluster whose secret has not arrived goes active
		// without a certificate and refuses every connection; with 0s it
		// stays warming until meshid delivers the secret.
		InitialFetchTimeout: durationpb.New(0),
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{
			ApiConfigSource: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{
					TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
						EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: SDSCluster},
					},
				}},
				SetNodeOnFirstMessageOnly: true,
			},
		},
	}
}

func sdsSecret(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: SDSConfigSource()}
}

// commonTLS presents "default" and validates the peer with the named
// validation secret; with peer set, only that URI SAN is accepted.
func commonTLS(validationName string, peer *spiffeid.ID) *tlsv3.CommonTlsContext {
	def := &tlsv3.CertificateValidationContext{}
	if peer != nil {
		def.MatchTypedSubjectAltNames = []*tlsv3.SubjectAltNameMatcher{{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{
				MatchPattern: &matcherv3.StringMatcher_Exact{Exact: peer.String()},
			},
		}}
	}
	return &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsSecret(SecretDefault)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         def,
				ValidationContextSdsSecretConfig: sdsSecret(validationName),
			},
		},
	}
}

func sdsCluster(socket string) *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 SDSCluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(time.Second),
		LoadAssignment: loadAssignment(SDSCluster, &corev3.Address{
			Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: socket}},
		}),
	}
	opts := &httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
				},
			},
		},
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{
		"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(opts),
	}
	return c
}

// plainCluster is a one-endpoint cluster: STATIC for an IP, STRICT_DNS for a
// host name.
func plainCluster(name, host string, port uint32, timeout time.Duration) *clusterv3.Cluster {
	typ := clusterv3.Cluster_STRICT_DNS
	if _, err := netip.ParseAddr(host); err == nil {
		typ = clusterv3.Cluster_STATIC
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(timeout),
		LoadAssignment:       loadAssignment(name, socketAddress(host, port)),
	}
}

func loadAssignment(cluster string, addr *corev3.Address) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{
		ClusterName: cluster,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{
					Endpoint: &endpointv3.Endpoint{Address: addr},
				},
			}},
		}},
	}
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// tcpListener listens on ip:port and forwards to cluster with tcp_proxy,
// terminating TLS with tls when it is set.
func tcpListener(name, ip string, port uint32, cluster string, tls *tlsv3.DownstreamTlsContext) (*listenerv3.Listener, error) {
	tp := &tcpproxyv3.TcpProxy{
		StatPrefix:       name,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
	}
	tpAny, err := typedConfig(tp)
	if err != nil {
		return nil, err
	}
	fc := &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{
		Name:       "envoy.filters.network.tcp_proxy",
		ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: tpAny},
	}}}
	if tls != nil {
		if fc.TransportSocket, err = transportSocket(tls); err != nil {
			return nil, err
		}
	}
	return &listenerv3.Listener{
		Name:         name,
		Address:      socketAddress(ip, port),
		FilterChains: []*listenerv3.FilterChain{fc},
	}, nil
}

func transportSocket(m validatable) (*corev3.TransportSocket, error) {
	a, err := typedConfig(m)
	if err != nil {
		return nil, err
	}
	return &corev3.TransportSocket{
		Name:       "envoy.transport_sockets.tls",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a},
	}, nil
}

type validatable interface {
	proto.Message
	ValidateAll() error
}

// typedConfig validates m (ValidateAll on the outer message does not look
// inside an Any) and packs it.
func typedConfig(m validatable) (*anypb.Any, error) {
	if err := m.ValidateAll(); err != nil {
		return nil, fmt.Errorf("generated %s is invalid: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return anypb.New(m)
}

func mustAny(m validatable) *anypb.Any {
	a, err := typedConfig(m)
	if err != nil {
		panic(err) // a constant message; a failure is a bug here
	}
	return a
}
