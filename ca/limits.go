package ca

import (
	"fmt"
	"time"
)

// Limits on what goes into an SVID. They are exported so the admin API
// refuses a request with the same rule the CA applies when it signs.
const (
	// MaxSPIFFEIDLen is the SPIFFE standard's bound on a SPIFFE ID (2048
	// bytes of URI).
	MaxSPIFFEIDLen = 2048
	// MinX509SVIDTTL is the shortest X.509-SVID lifetime a caller may ask
	// for: shorter ones are dead before a workload can use and renew them
	// (they are back-dated for clock skew and renewed at half-life).
	MinX509SVIDTTL = time.Minute
	// MinJWTSVIDTTL is the shortest JWT-SVID lifetime the server accepts.
	MinJWTSVIDTTL = 30 * time.Second
)

// CheckSPIFFEID refuses a SPIFFE ID longer than the standard allows.
func CheckSPIFFEID(id string) error {
	if len(id) > MaxSPIFFEIDLen {
		return fmt.Errorf("SPIFFE ID is %d bytes, longer than the %d the SPIFFE standard allows: %w", len(id), MaxSPIFFEIDLen, ErrInvalidSVIDRequest)
	}
	return nil
}

// CheckTTL checks a requested lifetime against the minimum for its kind
// and the signing key's remaining life, naming both limits on refusal.
func CheckTTL(ttl, minTTL, remaining time.Duration) error {
	if ttl < minTTL || ttl > remaining {
		return fmt.Errorf("ttl %s is outside the allowed range: at least %s and at most the CA's remaining life %s: %w",
			ttl, minTTL, max(remaining, 0).Truncate(time.Second), ErrInvalidSVIDRequest)
	}
	return nil
}
