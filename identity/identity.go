// Package identity holds the types shared by everything that hands SVIDs to
// workloads (SDS, the SPIFFE Workload API): who is calling, and the
// identities and bundles they currently hold. It has no logic of its own,
// so both the server and (later) the node agent can produce these values
// and both APIs can consume them.
package identity

import (
	"crypto"
	"crypto/x509"
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrNotEntitled means the caller asked for an identity it does not hold;
// APIs answer it with PermissionDenied.
var ErrNotEntitled = errors.New("caller is not entitled to that identity")

// ErrRevoked ends a subscription (or refuses one) whose caller authenticated
// with a certificate, or holds an identity, that has been revoked; the
// caller must authenticate again. A Subscription that can end this way has
// an Err() error method, non-nil once it has.
var ErrRevoked = errors.New("credential revoked")

// Caller is an authenticated client of a workload API.
type Caller struct {
	// Selectors are what attestation proved, e.g. "unix:uid:1000"; they are
	// matched against registration entries.
	Selectors []string
	// IDs are identities the caller holds directly: the SPIFFE ID of the
	// client certificate it presented, or the one its join token names.
	IDs []spiffeid.ID
	// Serial is the hex serial of the client certificate the caller
	// authenticated with, if it did: revoking that certificate ends the
	// caller's streams.
	Serial string
	// Label names the caller in logs ("uid:1000 gid:1000 pid:42").
	Label string
	// Check, if set, says whether what was attested still holds: for a
	// local process, that it still runs and its pid names no other
	// process. The APIs call it (through Recheck) before every send and end
	// the stream with PermissionDenied when it fails. Nil for callers that
	// need no re-check.
	Check func() error
}

// Recheck runs Check, if the caller has one.
func (c Caller) Recheck() error {
	if c.Check == nil {
		return nil
	}
	return c.Check()
}

// SVID is one X.509-SVID with its private key, ready to hand out.
type SVID struct {
	ID       spiffeid.ID
	EntryID  string
	Hint     string
	Certs    []*x509.Certificate // leaf first, then intermediates
	ChainPEM []byte
	Key      crypto.Signer
	KeyPEM   []byte
	KeyDER   []byte // PKCS#8
	Serial   string
	NotAfter time.Time
}

// Bundle is the trust bundle of one trust domain.
type Bundle struct {
	TrustDomain     spiffeid.TrustDomain
	X509Authorities []*x509.Certificate
	PEM             []byte
	// CRLs (DER), one per CA that signs in this trust domain (possibly
	// empty), so a peer that checks revocation has one for every CA in a
	// chain, as Envoy requires. CRLPEM is the same, PEM-encoded.
	CRLs   [][]byte
	CRLPEM []byte
	// CRLLeafOnly says the CRLs cover the issuers of leaves but not every
	// CA up to the root (an upstream chain whose upper CAs we cannot sign
	// CRLs for): peers must check only the leaf, as Envoy's
	// only_verify_leaf_cert_crl does.
	CRLLeafOnly bool
	// Version changes whenever the content does; equal versions mean equal
	// content.
	Version string
}

// JWTBundle is the JWT signing keys of one trust domain, as a JWKS
// document (each key with its kid), the form go-spiffe's jwtbundle.Parse
// reads and the Workload API's FetchJWTBundles carries.
type JWTBundle struct {
	TrustDomain spiffeid.TrustDomain
	JWKS        []byte
	// Version changes whenever the content does.
	Version string
}

// JWTSVID is one signed JWT-SVID.
type JWTSVID struct {
	ID        spiffeid.ID
	Token     string
	Hint      string
	ExpiresAt time.Time
}

// Snapshot is everything one caller may see at one moment. Snapshots are
// immutable: a change produces a new one.
type Snapshot struct {
	// SVIDs the caller is entitled to; the first is its default.
	SVIDs []*SVID
	// Bundles, the caller's own trust domain first.
	Bundles []*Bundle
	// JWTBundles, the caller's own trust domain first.
	JWTBundles []*JWTBundle
}

// SVIDFor returns the caller's SVID for id, if it has one.
func (s *Snapshot) SVIDFor(id spiffeid.ID) *SVID {
	for _, v := range s.SVIDs {
		if v.ID == id {
			return v
		}
	}
	return nil
}

// BundleFor returns the bundle of td, if the caller may see it.
func (s *Snapshot) BundleFor(td spiffeid.TrustDomain) *Bundle {
	for _, b := range s.Bundles {
		if b.TrustDomain == td {
			return b
		}
	}
	return nil
}

// Subscription is one caller's live view of its identities.
type Subscription interface {
	// Snapshot returns the current identities and bundles.
	Snapshot() *Snapshot
	// Changed is signalled whenever Snapshot has changed; signals coalesce,
	// so a slow reader sees the latest state, not every step.
	Changed() <-chan struct{}
	// Close ends the subscription.
	Close()
}
