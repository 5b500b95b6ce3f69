package controlplane

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/store"
)

// MintRequest asks for one X.509-SVID.
type MintRequest struct {
	SpiffeID string
	// CSR (DER or PEM) carries the caller's public key; without it the
	// server makes the key pair of KeyType.
	CSR      []byte
	KeyType  ca.KeyType
	TTL      time.Duration // 0: the entry's or the server's default
	DNSNames []string
	EntryID  string
	// Requester is who asked, recorded in the inventory.
	Requester string
	// ClampTTL shortens a TTL that outlives the CA instead of refusing:
	// for renewals, where an entry's TTL must not stop a CA near its end
	// from serving.
	ClampTTL bool
	// publicKey, set only by the local signer, is the key of a CSR this
	// process made itself a moment ago: its self-signature proves nothing
	// new, and checking it would double the cost of a renewal.
	publicKey crypto.PublicKey
}

// MintX509SVID signs an X.509-SVID and records it in the inventory before
// returning it, so that no certificate we hand out is missing from it.
// Request errors are *InvalidArgumentError.
func (s *Server) MintX509SVID(ctx context.Context, req MintRequest) (*ca.X509SVID, error) {
	svid, err := s.mint(ctx, req)
	if err != nil {
		s.metrics.IssueErrors.Inc()
		return nil, err
	}
	s.metrics.Issued.WithLabelValues("x509").Inc()
	return svid, nil
}

func (s *Server) mint(ctx context.Context, req MintRequest) (*ca.X509SVID, error) {
	id, err := s.parseWorkloadID(req.SpiffeID)
	if err != nil {
		return nil, err
	}
	if err := validateDNSNames(req.DNSNames); err != nil {
		return nil, err
	}
	if req.TTL < 0 {
		return nil, invalidf("ttl %s must not be negative", req.TTL)
	}
	if req.TTL > 0 && !req.ClampTTL {
		// An explicit request (x509 mint --ttl); renewals of an entry
		// stored by an older version keep being served as before.
		if err := s.validateX509TTL(req.TTL); err != nil {
			return nil, err
		}
	}
	a, caID := s.activeCA()
	now := s.now()
	ttl := req.TTL
	if ttl == 0 {
		// The default never outlives the CA: clamp instead of failing, so
		// a CA near its end still serves (shorter) SVIDs.
		ttl = min(s.cfg.SVIDTTL, a.RemainingLife(now))
		if ttl <= 0 {
			return nil, errors.New("the active CA has expired")
		}
	} else if rem := a.RemainingLife(now); ttl > rem {
		if !req.ClampTTL || rem <= 0 {
			return nil, invalidf("ttl %s is longer than the CA's remaining life %s", ttl, rem.Truncate(time.Second))
		}
		ttl = rem
	}

	// Renewals may queue longer than interactive requests: their SVID in
	// hand is still valid, and a refusal only means a retry later.
	maxWait := s.cfg.SignQueueTimeout
	if strings.HasPrefix(req.Requester, "workload") {
		maxWait = max(maxWait, 30*time.Second)
	}
	waited, release, err := s.limiter.acquire(ctx, maxWait)
	if err != nil {
		return nil, err
	}
	// The slot bounds signatures (CPU), not the inventory write after
	// them: released once signed, so that rows waiting for their commit
	// do not hold signing slots, and a batch of them shares one fsync.
	var once sync.Once
	done := func() { once.Do(release) }
	defer done()
	s.metrics.SignWait.Observe(waited.Seconds())

	var svid *ca.X509SVID
	if req.publicKey != nil {
		svid, err = a.SignX509SVID(ca.SVIDRequest{ID: id, PublicKey: req.publicKey, DNSNames: req.DNSNames, TTL: ttl, Now: now})
		if err != nil {
			return nil, mintError(err)
		}
	} else if len(req.CSR) > 0 {
		csr, err := ca.ParseCSR(req.CSR)
		if err != nil {
			return nil, &InvalidArgumentError{msg: err.Error()}
		}
		svid, err = a.SignX509SVID(ca.SVIDRequest{ID: id, PublicKey: csr.PublicKey, DNSNames: req.DNSNames, TTL: ttl, Now: now})
		if err != nil {
			return nil, mintError(err)
		}
	} else {
		kt := req.KeyType
		if kt == "" {
			kt = ca.KeyP256
		}
		svid, err = a.MintX509SVID(id, kt, req.DNSNames, ttl, now)
		if err != nil {
			return nil, mintError(err)
		}
	}
	done()
	s.noteIssued(caID, svid.NotAfter)
	if err := s.store.RecordSVID(ctx, store.IssuedSVID{
		Serial:    svid.Serial,
		SpiffeID:  req.SpiffeID,
		NotBefore: svid.NotBefore,
		NotAfter:  svid.NotAfter,
		EntryID:   req.EntryID,
		Requester: req.Requester,
		CAID:      caID,
		IssuedAt:  now,
	}); err != nil {
		// The certificate is dropped: one we cannot account for is never
		// handed out.
		return nil, fmt.Errorf("record issued svid %s: %w", svid.Serial, err)
	}
	return svid, nil
}

// mintError turns CA errors that the caller caused into InvalidArgument.
func mintError(err error) error {
	for _, e := range []error{ca.ErrTTLExceedsCA, ca.ErrForeignID, ca.ErrUnsupportedKey, ca.ErrBadCSR, ca.ErrInvalidSVIDRequest} {
		if errors.Is(err, e) {
			return &InvalidArgumentError{msg: err.Error()}
		}
	}
	return fmt.Errorf("sign svid: %w", err)
}
