package bench

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"time"

	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// fanout changes the bundle through the admin API and waits for every
// ready agent's stream to deliver the new version.
func (r *agentsRun) fanout(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent, tick *time.Ticker, progress func(string)) (*FanoutResult, error) {
	fr := &FanoutResult{Trigger: r.cfg.Fanout}
	for _, a := range agents {
		if a.isReady() {
			fr.Targets++
		}
	}
	var call func() error
	switch r.cfg.Fanout {
	case FanoutRevoke:
		// One of the run's own SVIDs: the first agent's, its first entry.
		var serialHex string
		for _, a := range agents {
			if a.isReady() && len(a.entries) > 0 {
				serialHex = a.serials[a.entries[0]]
				break
			}
		}
		serial, ok := new(big.Int).SetString(serialHex, 16)
		if !ok {
			return nil, fmt.Errorf("fan-out: no SVID of this run to revoke")
		}
		fr.Serial = serialHex
		r.fanSerial.Store(serial)
		call = func() error {
			_, err := admin.Revoke(ctx, &adminv1.RevokeRequest{Serial: serialHex})
			if err != nil {
				return fmt.Errorf("Revoke %s: %w", serialHex, err)
			}
			return nil
		}
	case FanoutPrepare:
		// Only one CA can be prepared at a time: one left by a previous
		// run is activated first (that changes no bundle), so the prepare
		// below is the change measured.
		cas, err := admin.ListCAs(ctx, &adminv1.ListCAsRequest{})
		if err != nil {
			return nil, fmt.Errorf("ListCAs: %w", err)
		}
		for _, c := range cas.GetCas() {
			if c.GetState() == "prepared" {
				if _, err := admin.ActivateCA(ctx, &adminv1.ActivateCARequest{Force: true}); err != nil {
					return nil, fmt.Errorf("ActivateCA (to make room for the measured prepare): %w", err)
				}
			}
		}
		call = func() error {
			if _, err := admin.PrepareCA(ctx, &adminv1.PrepareCARequest{}); err != nil {
				return fmt.Errorf("PrepareCA: %w", err)
			}
			return nil
		}
	}
	progress(fmt.Sprintf("fan-out (%s): a new bundle to %d agents", r.cfg.Fanout, fr.Targets))
	start := time.Now()
	r.fanStart.Store(start.UnixNano())
	err := call()
	ret := time.Now()
	fr.Call = ret.Sub(start)
	if err != nil {
		return nil, err
	}
	deadline := time.NewTimer(r.cfg.Timeout)
	defer deadline.Stop()
	for got := 0; got < fr.Targets; {
		select {
		case <-r.fanArrived:
			got++
		case <-tick.C:
			progress(fmt.Sprintf("fan-out: %d/%d agents have the new bundle", got, fr.Targets))
		case <-deadline.C:
			r.fail("fan-out: only %d of %d agents got the new bundle within %s", got, fr.Targets, r.cfg.Timeout)
			got = fr.Targets
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	var fromRet, fromStart []time.Duration
	for _, a := range agents {
		a.mu.Lock()
		if !a.fanAt.IsZero() {
			fromStart = append(fromStart, a.fanAt.Sub(start))
			fromRet = append(fromRet, max(0, a.fanAt.Sub(ret)))
			fr.Got++
			if a.fanChecked {
				fr.Checked++
			}
		}
		a.mu.Unlock()
	}
	if fr.Checked < fr.Got {
		r.fail("fan-out: %d of %d new bundles do not carry the change", fr.Got-fr.Checked, fr.Got)
	}
	fr.FromReturn, fr.FromStart = summarize(fromRet), summarize(fromStart)
	return fr, nil
}

// nodeCert checks the node SVID (for key, naming id) and makes it the
// client certificate.
func nodeCert(key crypto.Signer, chain [][]byte, id spiffeid.ID) (*tls.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("attest: empty node SVID")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("node SVID: %w", err)
	}
	got, err := x509svid.IDFromCert(leaf)
	if err != nil || got != id {
		return nil, fmt.Errorf("node SVID names %s (%v), not %s", got, err, id)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return nil, errors.New("node SVID is not for the node key")
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// checkSVID checks an issued SVID (for key, naming spiffeID) and returns
// its serial, hex.
func checkSVID(chain [][]byte, key crypto.Signer, spiffeID string) (string, error) {
	if len(chain) == 0 {
		return "", errors.New("empty SVID chain")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return "", fmt.Errorf("SVID: %w", err)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || id.String() != spiffeID {
		return "", fmt.Errorf("SVID names %s (%v), not %s", id, err, spiffeID)
	}
	if pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(key.Public()) {
		return "", errors.New("SVID is not for the key its CSR carried")
	}
	return leaf.SerialNumber.Text(16), nil
}

// checkInventory confirms every SVID issued is in the server's inventory,
// recorded for the entry it was signed for; it returns how many were found.
func (r *agentsRun) checkInventory(ctx context.Context, admin adminv1.AdminServiceClient, agents []*simAgent) (int, error) {
	want := map[string]string{} // serial -> entry ID
	for _, a := range agents {
		for id, s := range a.serials {
			want[s] = id
		}
	}
	req := &adminv1.ListCertsRequest{IncludeExpired: true}
	found := 0
	for {
		resp, err := admin.ListCerts(ctx, req)
		if err != nil {
			return 0, fmt.Errorf("read inventory: %w", err)
		}
		for _, c := range resp.GetCerts() {
			s := new(big.Int)
			if _, ok := s.SetString(c.GetSerial(), 16); !ok {
				continue
			}
			key := s.Text(16)
			if eid, ok := want[key]; ok {
				if c.GetEntryId() != eid {
					return found, fmt.Errorf("inventory: serial %s is recorded for entry %q, signed for %s", key, c.GetEntryId(), eid)
				}
				found++
				delete(want, key)
			}
		}
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	if len(want) > 0 {
		return found, fmt.Errorf("%d issued serials are missing from the inventory", len(want))
	}
	return found, nil
}
