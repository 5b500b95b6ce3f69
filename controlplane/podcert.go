package controlplane

import (
	"context"
	"crypto"
	"fmt"
	"time"
)

// Kubernetes' limits on a pod certificate's lifetime (KEP-4317): the API
// server refuses a status whose notAfter-notBefore is outside them.
const (
	PodCertMinLifetime = time.Hour
	PodCertMaxLifetime = 91 * 24 * time.Hour
)

// podCertSkew is how far the CA backdates NotBefore (ca's svidClockSkew):
// the TTL asked for is shortened by it so that notAfter-notBefore, which
// is what the API server bounds by maxExpirationSeconds, lands on the
// lifetime meant.
const podCertSkew = 10 * time.Second

// PodCertRequest is a PodCertificateRequest's spec as the API server
// verified it: the SPIFFE ID is made from Namespace and ServiceAccount
// only, the rest is recorded in the inventory.
type PodCertRequest struct {
	Namespace      string
	ServiceAccount string
	PodName        string
	PodUID         string
	NodeName       string
	NodeUID        string
	// PublicKey is the key from the stub CSR (its signature checked by the
	// caller and by the API server).
	PublicKey crypto.PublicKey
	// MaxLifetime is spec.maxExpirationSeconds; 0 means Kubernetes'
	// default of 24 h.
	MaxLifetime time.Duration
}

// PodCert is an issued pod certificate.
type PodCert struct {
	SpiffeID  string
	Serial    string
	ChainDER  [][]byte // leaf first, then intermediates (no root)
	NotBefore time.Time
	NotAfter  time.Time
}

// PodCertSpiffeID is the identity of a pod certificate.
func (s *Server) PodCertSpiffeID(namespace, serviceAccount string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", s.td.Name(), namespace, serviceAccount)
}

// SignPodCertificate signs a pod certificate through MintX509SVID, so the
// signing limiter, the inventory row and the issue metrics are those of
// every SVID. The lifetime is min(--svid-ttl, MaxLifetime), never below
// Kubernetes' 1 h minimum. Errors other than *InvalidArgumentError are
// transient (store, signing limit, CA near its end).
func (s *Server) SignPodCertificate(ctx context.Context, req PodCertRequest) (*PodCert, error) {
	if req.Namespace == "" || req.ServiceAccount == "" {
		return nil, invalidf("pod certificate: namespace and service account are required")
	}
	if req.PublicKey == nil {
		return nil, invalidf("pod certificate: public key is required")
	}
	maxLife := req.MaxLifetime
	if maxLife == 0 {
		maxLife = 24 * time.Hour
	}
	if maxLife < PodCertMinLifetime || maxLife > PodCertMaxLifetime {
		return nil, invalidf("pod certificate: maxExpirationSeconds %s outside [%s, %s]", maxLife, PodCertMinLifetime, PodCertMaxLifetime)
	}
	life := max(min(s.cfg.SVIDTTL, maxLife), PodCertMinLifetime)
	id := s.PodCertSpiffeID(req.Namespace, req.ServiceAccount)
	svid, err := s.MintX509SVID(ctx, MintRequest{
		SpiffeID: id,
		TTL:      life - podCertSkew,
		Requester: fmt.Sprintf("pod-certificate pod %s/%s uid %s node %s uid %s",
			req.Namespace, req.PodName, req.PodUID, req.NodeName, req.NodeUID),
		publicKey: req.PublicKey,
	})
	if err != nil {
		return nil, err
	}
	// The API server would refuse anything else, and a refusal there
	// looks like a transient error: catch it here with a clear message.
	if got := svid.NotAfter.Sub(svid.NotBefore); got < PodCertMinLifetime || got > maxLife {
		return nil, fmt.Errorf("pod certificate %s: lifetime %s outside [%s, %s] (the CA is near its end?)", svid.Serial, got, PodCertMinLifetime, maxLife)
	}
	chain := make([][]byte, 0, 1+len(svid.ChainDER))
	chain = append(chain, svid.CertDER)
	chain = append(chain, svid.ChainDER...)
	return &PodCert{SpiffeID: id, Serial: svid.Serial, ChainDER: chain, NotBefore: svid.NotBefore, NotAfter: svid.NotAfter}, nil
}
