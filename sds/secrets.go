package sds

import (
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/meshid/identity"
)

// SecretTypeURL is the xDS type of every resource this server sends.
const SecretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// Names Envoy asks for that are not SPIFFE IDs; both Istio's and SPIRE's
// conventions, so existing Envoy configs work unchanged.
const (
	NameDefault = "default" // the caller's own (first) SVID
	NameRootCA  = "ROOTCA"  // the caller's trust-domain bundle, as trusted_ca
	NameAll     = "ALL"     // every bundle, for the SPIFFE certificate validator
)

// SPIFFEValidatorName is Envoy's SPIFFE certificate validator extension.
const SPIFFEValidatorName = "envoy.tls.cert_validator.spiffe"

// resolved is one answerable secret name: key identifies its content (equal
// keys mean identical secrets), build makes the proto.
type resolved struct {
	key   string
	build func() (*tlsv3.Secret, error)
}

// resolve decides what name means for the holder of snap. ok is false when
// the caller is not entitled to it (or it does not exist): such a name is
// never answered with anything else.
func resolve(name string, snap *identity.Snapshot) (resolved, bool) {
	switch name {
	case NameDefault:
		if len(snap.SVIDs) == 0 {
			return resolved{}, false
		}
		return svidSecret(name, snap.SVIDs[0]), true
	case NameRootCA:
		if len(snap.Bundles) == 0 {
			return resolved{}, false
		}
		return bundleSecret(name, snap.Bundles[0]), true
	case NameAll:
		if len(snap.Bundles) == 0 {
			return resolved{}, false
		}
		return allBundlesSecret(name, snap.Bundles), true
	}
	if !strings.HasPrefix(name, "spiffe://") {
		return resolved{}, false
	}
	id, err := spiffeid.FromString(name)
	if err != nil {
		return resolved{}, false
	}
	if id.Path() == "" {
		b := snap.BundleFor(id.TrustDomain())
		if b == nil {
			return resolved{}, false
		}
		return bundleSecret(name, b), true
	}
	s := snap.SVIDFor(id)
	if s == nil {
		return resolved{}, false
	}
	return svidSecret(name, s), true
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

func svidSecret(name string, s *identity.SVID) resolved {
	return resolved{
		key: "svid:" + s.Serial,
		build: func() (*tlsv3.Secret, error) {
			return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: inline(s.ChainPEM),
				PrivateKey:       inline(s.KeyPEM),
			}}}, nil
		},
	}
}

func bundleSecret(name string, b *identity.Bundle) resolved {
	return resolved{
		key: "bundle:" + b.TrustDomain.Name() + ":" + b.Version,
		build: func() (*tlsv3.Secret, error) {
			vc := &tlsv3.CertificateValidationContext{TrustedCa: inline(b.PEM)}
			if len(b.CRLPEM) > 0 {
				// One CRL per CA, empty or not: with any CRL present Envoy
				// requires one for every CA of a chain, unless told to check
				// only the leaf (when we cannot cover the upper CAs).
				vc.Crl = inline(b.CRLPEM)
				vc.OnlyVerifyLeafCertCrl = b.CRLLeafOnly
			}
			return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: vc}}, nil
		},
	}
}

func allBundlesSecret(name string, bundles []*identity.Bundle) resolved {
	var key strings.Builder
	key.WriteString("all")
	for _, b := range bundles {
		key.WriteString(":" + b.TrustDomain.Name() + "=" + b.Version)
	}
	return resolved{
		key: key.String(),
		build: func() (*tlsv3.Secret, error) {
			cfg := &tlsv3.SPIFFECertValidatorConfig{}
			for _, b := range bundles {
				cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
					Name: b.TrustDomain.Name(),
					// CRLs inside a domain's PEM turn on CRL checks for it.
					TrustBundle: inline(spiffeTrustBundle(b)),
				})
			}
			tc, err := anypb.New(cfg)
			if err != nil {
				return nil, err
			}
			return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: SPIFFEValidatorName, TypedConfig: tc},
			}}}, nil
		},
	}
}

// spiffeTrustBundle is a domain's PEM for the SPIFFE validator: its CAs and,
// when they cover every CA of the chains, its CRLs (which switch on CRL
// checks for the whole chain; the validator has no leaf-only mode).
func spiffeTrustBundle(b *identity.Bundle) []byte {
	if b.CRLLeafOnly {
		return b.PEM
	}
	return append(append([]byte(nil), b.PEM...), b.CRLPEM...)
}
