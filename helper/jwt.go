package helper

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/meshid/meshid/internal/fsutil"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// jwtRetry is how soon a failed JWT-SVID fetch is tried again.
const jwtRetry = 5 * time.Second

// updateJWT fetches a JWT-SVID for the configured audiences and writes it
// and the JWT bundle; it returns when the token should be renewed (half
// its life, as the X.509-SVID is).
func (h *helper) updateJWT() (time.Time, error) {
	svid, jwks, err := h.api.fetchJWT(h.ctx, h.cfg.JWTAudience)
	if err != nil {
		return time.Time{}, err
	}
	// The server signed it; parsing without verifying only reads its
	// expiry, to know when to renew.
	tok, err := jwtsvid.ParseInsecure(svid.GetSvid(), h.cfg.JWTAudience)
	if err != nil {
		return time.Time{}, fmt.Errorf("read JWT-SVID: %w", err)
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(h.cfg.Dir, h.cfg.JWTBundleName), jwks, 0o644); err != nil {
		return time.Time{}, err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(h.cfg.Dir, h.cfg.JWTSVIDName), []byte(svid.GetSvid()), 0o600); err != nil {
		return time.Time{}, err
	}
	now := time.Now()
	h.log.Info("helper: wrote JWT-SVID", "spiffe_id", tok.ID.String(), "audience", h.cfg.JWTAudience, "expiry", tok.Expiry,
		"dir", h.cfg.Dir)
	return now.Add(tok.Expiry.Sub(now) / 2), nil
}

// keepJWT keeps the JWT-SVID file fresh until the helper's context ends.
func (h *helper) keepJWT() {
	for {
		next, err := h.updateJWT()
		if err != nil {
			if h.ctx.Err() != nil {
				return
			}
			h.log.Warn("helper: JWT-SVID update failed; keeping the file on disk", "err", err, "retry_in", jwtRetry)
			next = time.Now().Add(jwtRetry)
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-h.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
