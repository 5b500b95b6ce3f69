package envoyconfig

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// expect is what a sidecar bootstrap must contain. Empty fields are checked
// only for being well-formed.
type expect struct {
	nodeID, nodeCluster string
	socket              string
	validation          string            // ROOTCA or ALL
	listen              string            // ip:port
	upstreams           map[uint32]string // outbound local port -> SPIFFE ID
	admin               string            // ip:port; "-" for none
}

func TestGenerate(t *testing.T) {
	const (
		web = "spiffe://cluster.local/ns/shop/sa/web"
		db  = "spiffe://cluster.local/ns/shop/sa/db"
		fed = "spiffe://partner.example/payments/ledger"
	)
	tests := []struct {
		name string
		o    Options
		want expect
	}{
		{
			name: "defaults",
			o:    Options{SpiffeID: web, Socket: "/tmp/meshid/public/workload.sock", Admin: DefaultAdmin},
			want: expect{nodeID: "web.shop", nodeCluster: "meshid", socket: "/tmp/meshid/public/workload.sock",
				validation: SecretRootCA, listen: "0.0.0.0:15006", upstreams: map[uint32]string{}, admin: "127.0.0.1:15000"},
		},
		{
			name: "upstreams auto and fixed ports",
			o: Options{SpiffeID: web, Socket: "/run/meshid.sock", Upstreams: []string{
				db + "=db.shop.svc:5432",
				fed + "=[2001:db8::7]:8443@15001", // takes 15001: auto ports skip it
				db + "=10.0.0.9:5432",
			}},
			want: expect{socket: "/run/meshid.sock", validation: SecretRootCA,
				upstreams: map[uint32]string{15002: db, 15001: fed, 15003: db}},
		},
		{
			name: "auto ports skip listen and admin",
			o: Options{SpiffeID: web, Socket: "s", Listen: "127.0.0.1:15001", Admin: "127.0.0.1:15002",
				Upstreams: []string{db + "=db:1"}},
			want: expect{listen: "127.0.0.1:15001", admin: "127.0.0.1:15002", upstreams: map[uint32]string{15003: db}},
		},
		{
			name: "spiffe validator",
			o:    Options{SpiffeID: web, Socket: "/s.sock", Validation: ValidationSPIFFE, Upstreams: []string{fed + "=ledger.partner.example:443"}},
			want: expect{validation: SecretAll, upstreams: map[uint32]string{15001: fed}},
		},
		{
			name: "explicit node, ipv6 listen, no admin, non-k8s id",
			o: Options{SpiffeID: "spiffe://example.org/billing/worker", Socket: "@abstract-meshid", NodeID: "n1", NodeCluster: "c1",
				Listen: "[::]:9443", LocalApp: "localhost:3000"},
			want: expect{nodeID: "n1", nodeCluster: "c1", socket: "@abstract-meshid", listen: "[::]:9443", admin: "-", validation: SecretRootCA},
		},
		{
			name: "default node id from a non-k8s path",
			o:    Options{SpiffeID: "spiffe://example.org/billing/worker", Socket: "s"},
			want: expect{nodeID: "billing.worker"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := Generate(tt.o)
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			if !strings.Contains(string(out), "initial_fetch_timeout: 0s # ") {
				t.Errorf("initial_fetch_timeout is not explained in a comment")
			}
			b := parseAndValidate(t, out)
			checkSidecar(t, b, tt.want)
			built, err := Build(tt.o)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			if !proto.Equal(built, b) {
				t.Errorf("YAML does not round-trip to Build's bootstrap")
			}
		})
	}
}

// TestCommittedFiles loads every example bootstrap in deploy/envoy the
// strict way and checks that it is a well-formed meshid sidecar.
func TestCommittedFiles(t *testing.T) {
	files, err := filepath.Glob("../deploy/envoy/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 2 {
		t.Fatalf("want at least 2 example bootstraps in deploy/envoy, found %v", files)
	}
	var validations []string
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			b := parseAndValidate(t, data)
			got := checkSidecar(t, b, expect{})
			validations = append(validations, got.validation)
		})
	}
	for _, v := range []string{SecretRootCA, SecretAll} {
		if !slices.Contains(validations, v) {
			t.Errorf("no committed example validates with %q", v)
		}
	}
}

func TestBadInput(t *testing.T) {
	const web = "spiffe://cluster.local/ns/shop/sa/web"
	ok := Options{SpiffeID: web, Socket: "/s", Admin: DefaultAdmin}
	with := func(f func(*Options)) Options { o := ok; f(&o); return o }
	tests := []struct {
		name string
		o    Options
		want string
	}{
		{"missing spiffe id", with(func(o *Options) { o.SpiffeID = "" }), "--spiffe-id is required"},
		{"not a spiffe id", with(func(o *Options) { o.SpiffeID = "https://cluster.local/ns/a/sa/b" }), "--spiffe-id: invalid SPIFFE ID"},
		{"bad spiffe id chars", with(func(o *Options) { o.SpiffeID = "spiffe://Cluster.Local/ns/a" }), "--spiffe-id: invalid SPIFFE ID"},
		{"trust domain only", with(func(o *Options) { o.SpiffeID = "spiffe://cluster.local" }), "names a trust domain"},
		{"empty socket", with(func(o *Options) { o.Socket = " " }), "--socket must not be empty"},
		{"bad validation", with(func(o *Options) { o.Validation = "strict" }), `unknown --validation "strict"`},
		{"listen not ip", with(func(o *Options) { o.Listen = "localhost:15006" }), "--listen: invalid address"},
		{"listen no port", with(func(o *Options) { o.Listen = "0.0.0.0" }), "--listen: invalid address"},
		{"listen port 0", with(func(o *Options) { o.Listen = "0.0.0.0:0" }), "invalid port"},
		{"local app port too big", with(func(o *Options) { o.LocalApp = "127.0.0.1:70000" }), "--local-app"},
		{"admin clash", with(func(o *Options) { o.Admin = "127.0.0.1:15006" }), "--admin port 15006 is already used by --listen"},
		{"upstream without =", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local/ns/a/sa/b"} }), "want SPIFFE-ID=host:port"},
		{"upstream bad id", with(func(o *Options) { o.Upstreams = []string{"db=db:5432"} }), `--upstream "db=db:5432": invalid SPIFFE ID`},
		{"upstream td only", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local=db:5432"} }), "names a trust domain"},
		{"upstream no port", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local/db=db"} }), "invalid address"},
		{"upstream empty host", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local/db=:5432"} }), "empty host"},
		{"upstream bad local port", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local/db=db:5432@x"} }), "local port"},
		{"upstream port clash", with(func(o *Options) {
			o.Upstreams = []string{"spiffe://cluster.local/a=a:1@15001", "spiffe://cluster.local/b=b:1@15001"}
		}), "local port 15001 is already used"},
		{"upstream clashes with admin", with(func(o *Options) { o.Upstreams = []string{"spiffe://cluster.local/a=a:1@15000"} }), "already used by --admin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := Generate(tt.o)
			if err == nil {
				t.Fatalf("Generate succeeded, want error containing %q; output:\n%s", tt.want, out)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

// TestParseIsStrict makes sure the loader used on the committed files would
// notice a misspelt field or a typed_config type nobody registered.
func TestParseIsStrict(t *testing.T) {
	good, err := Generate(Options{SpiffeID: "spiffe://cluster.local/ns/a/sa/b", Socket: "/s"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, old, new string }{
		{"unknown field", "require_client_certificate: true", "require_client_certificates: true"},
		{"unknown typed_config type", "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
			"type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxyX"},
		{"unknown field inside typed_config", "stat_prefix: inbound", "stat_prefixx: inbound"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := strings.Replace(string(good), tt.old, tt.new, 1)
			if bad == string(good) {
				t.Fatalf("%q not in the generated YAML", tt.old)
			}
			if _, err := Parse([]byte(bad)); err == nil {
				t.Errorf("Parse accepted the bootstrap with %s", tt.name)
			}
		})
	}
}

// parseAndValidate loads a bootstrap strictly and runs ValidateAll on it and
// on every message packed in an Any inside it.
func parseAndValidate(t *testing.T, y []byte) *bootstrapv3.Bootstrap {
	t.Helper()
	b, err := Parse(y)
	if err != nil {
		t.Fatalf("strict parse: %v", err)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("ValidateAll: %v", err)
	}
	n := 0
	walkAnys(t, b.ProtoReflect(), func(m proto.Message) {
		n++
		v, ok := m.(interface{ ValidateAll() error })
		if !ok {
			t.Errorf("%T has no ValidateAll", m)
			return
		}
		if err := v.ValidateAll(); err != nil {
			t.Errorf("ValidateAll %T: %v", m, err)
		}
	})
	if n == 0 {
		t.Errorf("no typed_config found at all")
	}
	return b
}

// walkAnys calls f with the unpacked content of every Any under m.
func walkAnys(t *testing.T, m protoreflect.Message, f func(proto.Message)) {
	t.Helper()
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			t.Errorf("typed_config %s does not resolve: %v", a.GetTypeUrl(), err)
			return
		}
		f(inner)
		walkAnys(t, inner.ProtoReflect(), f)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					walkAnys(t, mv.Message(), f)
					return true
				})
			}
		case fd.IsList():
			if fd.Message() != nil {
				for i := 0; i < v.List().Len(); i++ {
					walkAnys(t, v.List().Get(i).Message(), f)
				}
			}
		case fd.Message() != nil:
			walkAnys(t, v.Message(), f)
		}
		return true
	})
}

func unpack[T proto.Message](t *testing.T, a *anypb.Any, what string) T {
	t.Helper()
	m, err := a.UnmarshalNew()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	v, ok := m.(T)
	if !ok {
		t.Fatalf("%s is %T, want %T", what, m, *new(T))
	}
	return v
}

func addrString(t *testing.T, a *corev3.Address) string {
	t.Helper()
	sa := a.GetSocketAddress()
	if sa == nil {
		t.Fatalf("address %v is not a socket address", a)
	}
	host := sa.GetAddress()
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.FormatUint(uint64(sa.GetPortValue()), 10)
}

// checkSidecar checks the structure of a meshid sidecar bootstrap against
// want and returns what it found.
func checkSidecar(t *testing.T, b *bootstrapv3.Bootstrap, want expect) expect {
	t.Helper()
	var got expect
	got.nodeID, got.nodeCluster = b.GetNode().GetId(), b.GetNode().GetCluster()
	if got.nodeID == "" || got.nodeCluster == "" {
		t.Errorf("node id %q and cluster %q must both be set for SDS", got.nodeID, got.nodeCluster)
	}
	if want.nodeID != "" && got.nodeID != want.nodeID {
		t.Errorf("node id = %q, want %q", got.nodeID, want.nodeID)
	}
	if want.nodeCluster != "" && got.nodeCluster != want.nodeCluster {
		t.Errorf("node cluster = %q, want %q", got.nodeCluster, want.nodeCluster)
	}
	got.admin = "-"
	if b.GetAdmin() != nil {
		got.admin = addrString(t, b.GetAdmin().GetAddress())
	}
	if want.admin != "" && got.admin != want.admin {
		t.Errorf("admin = %q, want %q", got.admin, want.admin)
	}

	clusters := map[string]*clusterv3.Cluster{}
	for _, c := range b.GetStaticResources().GetClusters() {
		clusters[c.GetName()] = c
	}

	// The SDS cluster: STATIC, HTTP/2, on the pipe.
	sds := clusters[SDSCluster]
	if sds == nil {
		t.Fatalf("no cluster %q", SDSCluster)
	}
	if sds.GetType() != clusterv3.Cluster_STATIC {
		t.Errorf("SDS cluster type = %v, want STATIC", sds.GetType())
	}
	eps := sds.GetLoadAssignment().GetEndpoints()
	if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 1 {
		t.Fatalf("SDS cluster must have exactly one endpoint: %v", sds.GetLoadAssignment())
	}
	got.socket = eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath()
	if got.socket == "" {
		t.Errorf("SDS cluster endpoint is not a pipe: %v", eps[0])
	}
	if want.socket != "" && got.socket != want.socket {
		t.Errorf("SDS pipe = %q, want %q", got.socket, want.socket)
	}
	hpoAny := sds.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if hpoAny == nil {
		t.Fatalf("SDS cluster has no HttpProtocolOptions")
	}
	hpo := unpack[*httpv3.HttpProtocolOptions](t, hpoAny, "SDS cluster protocol options")
	if hpo.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		t.Errorf("SDS cluster is not explicitly HTTP/2: %v", hpo)
	}

	// Every SDS secret uses the one config source (GRPC, V3, meshid_sds,
	// initial_fetch_timeout 0s, node on first message only).
	nSecrets := 0
	walkAnys(t, b.ProtoReflect(), func(m proto.Message) {
		walkSDS(m.ProtoReflect(), func(s *tlsv3.SdsSecretConfig) {
			nSecrets++
			if !proto.Equal(s.GetSdsConfig(), SDSConfigSource()) {
				t.Errorf("secret %q: sds_config = %v, want %v", s.GetName(), s.GetSdsConfig(), SDSConfigSource())
			}
			if s.GetSdsConfig().GetInitialFetchTimeout().AsDuration() != 0 {
				t.Errorf("secret %q: initial_fetch_timeout is not 0s", s.GetName())
			}
		})
	})
	if nSecrets == 0 {
		t.Errorf("no SDS secrets at all")
	}

	listeners := map[string]*listenerv3.Listener{}
	for _, l := range b.GetStaticResources().GetListeners() {
		listeners[l.GetName()] = l
	}

	// Inbound: mTLS with a required client certificate, "default" +
	// ROOTCA/ALL, tcp_proxy to the local app.
	in := listeners[InboundListener]
	if in == nil {
		t.Fatalf("no listener %q", InboundListener)
	}
	got.listen = addrString(t, in.GetAddress())
	if want.listen != "" && got.listen != want.listen {
		t.Errorf("inbound address = %q, want %q", got.listen, want.listen)
	}
	if len(in.GetFilterChains()) != 1 {
		t.Fatalf("inbound: want one filter chain, got %d", len(in.GetFilterChains()))
	}
	fc := in.GetFilterChains()[0]
	if fc.GetTransportSocket().GetName() != "envoy.transport_sockets.tls" {
		t.Errorf("inbound transport socket = %q", fc.GetTransportSocket().GetName())
	}
	down := unpack[*tlsv3.DownstreamTlsContext](t, fc.GetTransportSocket().GetTypedConfig(), "inbound transport socket")
	if !down.GetRequireClientCertificate().GetValue() {
		t.Errorf("inbound does not require a client certificate")
	}
	var sans []*tlsv3.SubjectAltNameMatcher
	got.validation, sans = checkCommonTLS(t, "inbound", down.GetCommonTlsContext())
	if len(sans) != 0 {
		t.Errorf("inbound has SAN matchers %v; any identity of the trust domain may connect", sans)
	}
	if want.validation != "" && got.validation != want.validation {
		t.Errorf("inbound validation secret = %q, want %q", got.validation, want.validation)
	}
	if c := tcpProxyCluster(t, "inbound", fc); c != LocalAppCluster || clusters[c] == nil {
		t.Errorf("inbound forwards to %q, want existing cluster %q", c, LocalAppCluster)
	}
	if clusters[LocalAppCluster].GetTransportSocket() != nil {
		t.Errorf("local app cluster must be plain TCP")
	}

	// Outbound: plain on 127.0.0.1, mTLS to a cluster that accepts only the
	// upstream's SPIFFE ID.
	got.upstreams = map[uint32]string{}
	for name, l := range listeners {
		if name == InboundListener {
			continue
		}
		sa := l.GetAddress().GetSocketAddress()
		if sa.GetAddress() != "127.0.0.1" {
			t.Errorf("outbound listener %q on %q, want 127.0.0.1", name, sa.GetAddress())
		}
		if len(l.GetFilterChains()) != 1 || l.GetFilterChains()[0].GetTransportSocket() != nil {
			t.Errorf("outbound listener %q: want one plain filter chain", name)
			continue
		}
		cn := tcpProxyCluster(t, name, l.GetFilterChains()[0])
		c := clusters[cn]
		if c == nil {
			t.Errorf("outbound listener %q forwards to missing cluster %q", name, cn)
			continue
		}
		up := unpack[*tlsv3.UpstreamTlsContext](t, c.GetTransportSocket().GetTypedConfig(), "cluster "+cn+" transport socket")
		v, sans := checkCommonTLS(t, "cluster "+cn, up.GetCommonTlsContext())
		if v != got.validation {
			t.Errorf("cluster %s validates with %q, inbound with %q", cn, v, got.validation)
		}
		if len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI || sans[0].GetMatcher().GetExact() == "" {
			t.Errorf("cluster %s: want exactly one URI SAN exact matcher, got %v", cn, sans)
			continue
		}
		id := sans[0].GetMatcher().GetExact()
		if _, err := workloadID(id); err != nil {
			t.Errorf("cluster %s matches SAN %q: %v", cn, id, err)
		}
		got.upstreams[sa.GetPortValue()] = id
	}
	if want.upstreams != nil && !maps.Equal(got.upstreams, want.upstreams) {
		t.Errorf("outbound port -> upstream ID = %v, want %v", got.upstreams, want.upstreams)
	}
	return got
}

// checkCommonTLS checks that ctx presents "default" and uses a combined
// validation context with ROOTCA or ALL; it returns that name and the static
// SAN matchers.
func checkCommonTLS(t *testing.T, what string, ctx *tlsv3.CommonTlsContext) (string, []*tlsv3.SubjectAltNameMatcher) {
	t.Helper()
	certs := ctx.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 || certs[0].GetName() != SecretDefault {
		t.Errorf("%s: tls_certificate_sds_secret_configs = %v, want one named %q", what, certs, SecretDefault)
	}
	if len(ctx.GetTlsCertificates()) != 0 {
		t.Errorf("%s: has static certificates", what)
	}
	cvc := ctx.GetCombinedValidationContext()
	if cvc == nil {
		t.Errorf("%s: no combined_validation_context", what)
		return "", nil
	}
	name := cvc.GetValidationContextSdsSecretConfig().GetName()
	if name != SecretRootCA && name != SecretAll {
		t.Errorf("%s: validation secret %q, want %q or %q", what, name, SecretRootCA, SecretAll)
	}
	return name, cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
}

func tcpProxyCluster(t *testing.T, what string, fc *listenerv3.FilterChain) string {
	t.Helper()
	fs := fc.GetFilters()
	if len(fs) != 1 || fs[0].GetName() != "envoy.filters.network.tcp_proxy" {
		t.Fatalf("%s: want one tcp_proxy filter, got %v", what, fs)
	}
	return unpack[*tcpproxyv3.TcpProxy](t, fs[0].GetTypedConfig(), what+" tcp_proxy").GetCluster()
}

// walkSDS calls f with every SdsSecretConfig in m (not looking into Anys:
// walkAnys hands those over separately).
func walkSDS(m protoreflect.Message, f func(*tlsv3.SdsSecretConfig)) {
	if s, ok := m.Interface().(*tlsv3.SdsSecretConfig); ok {
		f(s)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
		case fd.IsList():
			if fd.Message() != nil {
				for i := 0; i < v.List().Len(); i++ {
					walkSDS(v.List().Get(i).Message(), f)
				}
			}
		case fd.Message() != nil:
			walkSDS(v.Message(), f)
		}
		return true
	})
}
