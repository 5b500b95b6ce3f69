package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/store"
)

// ServerID is the SPIFFE ID of a meshid server's own serving certificate.
func (s *Server) ServerID() spiffeid.ID {
	id, _ := spiffeid.FromSegments(s.td, "meshid", "server")
	return id
}

// serverTLS is the TLS side of the TCP endpoints: the server presents its
// own SVID (renewed like any other) and asks, without requiring, for a
// client SVID, which it verifies against the trust bundle. A caller without
// one may still authenticate with a join token.
type serverTLS struct {
	srv *Server
	sub identity.Subscription

	mu     sync.Mutex
	serial string
	cert   *tls.Certificate
}

func (s *Server) newServerTLS(ctx context.Context, dnsNames []string) (*serverTLS, error) {
	if err := validateDNSNames(dnsNames); err != nil {
		return nil, fmt.Errorf("--server-dns: %w", err)
	}
	sub, err := s.ids.SubscribeWith(ctx, identity.Caller{Label: "meshid server"}, cacheEntry(store.Entry{
		ID: "meshid-server", SpiffeID: s.ServerID().String(), DNSNames: dnsNames,
	}))
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w", err)
	}
	return &serverTLS{srv: s, sub: sub}, nil
}

func (st *serverTLS) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	snap := st.sub.Snapshot()
	if len(snap.SVIDs) == 0 {
		return nil, errors.New("no server certificate")
	}
	svid := snap.SVIDs[0]
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.serial != svid.Serial {
		c := &tls.Certificate{PrivateKey: svid.Key, Leaf: svid.Certs[0]}
		for _, x := range svid.Certs {
			c.Certificate = append(c.Certificate, x.Raw)
		}
		st.serial, st.cert = svid.Serial, c
	}
	return st.cert, nil
}

// verifyClient accepts no certificate (token auth may follow) or a valid
// X509-SVID of this trust domain.
func (st *serverTLS) verifyClient(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return nil
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return fmt.Errorf("client certificate: %w", err)
		}
		certs = append(certs, c)
	}
	_, chains, err := x509svid.Verify(certs, x509bundle.FromX509Authorities(st.srv.td, st.srv.BundleCerts()))
	if err != nil {
		return fmt.Errorf("client certificate is not a valid SVID of %s: %w", st.srv.td, err)
	}
	// A revoked SVID may not renew itself.
	if st.srv.isRevoked(chains[0][0]) {
		return fmt.Errorf("client certificate %x is revoked", chains[0][0].SerialNumber)
	}
	return nil
}

func (st *serverTLS) config(nextProtos ...string) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS12,
		ClientAuth:            tls.RequestClientCert,
		GetCertificate:        st.getCertificate,
		VerifyPeerCertificate: st.verifyClient,
		NextProtos:            nextProtos,
	}
}

func (st *serverTLS) close() { st.sub.Close() }

// errNoCredential tells a remote caller what it must present.
var errNoCredential = errors.New("present an SVID as TLS client certificate or a join token as 'authorization: Bearer <token>'")

// remoteCaller identifies a TCP caller: by its verified client SVID (it
// may renew itself), else by a join token.
func (s *Server) remoteCaller(ctx context.Context, peerCerts []*x509.Certificate, authz []string, conn string) (identity.Caller, error) {
	if len(peerCerts) > 0 {
		// Checked here too, not only in the handshake: a resumed TLS
		// session skips VerifyPeerCertificate, and a connection outlives
		// the revocation of the certificate that opened it.
		if s.isRevoked(peerCerts[0]) {
			return identity.Caller{}, fmt.Errorf("client certificate %x is revoked", peerCerts[0].SerialNumber)
		}
		id, err := x509svid.IDFromCert(peerCerts[0])
		if err != nil {
			return identity.Caller{}, fmt.Errorf("client certificate: %w", err)
		}
		serial := peerCerts[0].SerialNumber.Text(16)
		// Known before subscribing: its renewals are recorded under the
		// entry it was issued under.
		if _, err := s.entryOfSerial(ctx, serial); err != nil {
			return identity.Caller{}, err
		}
		return identity.Caller{IDs: []spiffeid.ID{id}, Serial: serial, Label: "svid " + id.String() + " " + conn}, nil
	}
	for _, a := range authz {
		tok, ok := strings.CutPrefix(a, "Bearer ")
		if !ok {
			continue
		}
		id, err := s.RedeemJoinToken(ctx, strings.TrimSpace(tok), conn)
		if err != nil {
			return identity.Caller{}, err
		}
		return identity.Caller{IDs: []spiffeid.ID{id}, Label: "token " + id.String() + " " + conn}, nil
	}
	return identity.Caller{}, errNoCredential
}

// grpcRemoteCaller is the sds.Authenticator for the TCP gRPC endpoint.
func (s *Server) grpcRemoteCaller(ctx context.Context) (identity.Caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return identity.Caller{}, errNoCredential
	}
	var certs []*x509.Certificate
	conn := p.Addr.String()
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
		certs = ti.State.PeerCertificates
		conn = connID(ti.State, conn)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	return s.remoteCaller(ctx, certs, md.Get("authorization"), conn)
}

// httpRemoteCaller is the sds.HTTPAuthenticator for the REST endpoint.
func (s *Server) httpRemoteCaller(r *http.Request) (identity.Caller, error) {
	var certs []*x509.Certificate
	conn := r.RemoteAddr
	if r.TLS != nil {
		certs = r.TLS.PeerCertificates
		conn = connID(*r.TLS, conn)
	}
	return s.remoteCaller(r.Context(), certs, r.Header.Values("Authorization"), conn)
}

// connID names one TLS connection for binding a single-use token: keying
// material exported from the handshake is unique to it, unlike the peer's
// ip:port, which another client behind the same NAT may reuse later.
func connID(st tls.ConnectionState, fallback string) string {
	km, err := st.ExportKeyingMaterial("EXPORTER-meshid-connection", nil, 16)
	if err != nil {
		return fallback
	}
	return fmt.Sprintf("%x", km)
}
