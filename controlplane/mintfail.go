package controlplane

import (
	"context"
	"errors"
)

// mintFailed records a failed first mint of a served identity and retries
// it with backoff; the caller is served everything else meanwhile.
func (ids *identities) mintFailed(sl *slot, err error) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.mintFailedLocked(sl, err)
}

func (ids *identities) mintFailedLocked(sl *slot, err error) {
	ids.srv.metrics.MintFailures.WithLabelValues(mintFailureReason(err)).Inc()
	if ids.closed || ids.slots[sl.entry.ID] != sl || sl.svid != nil {
		return // replaced, or another attempt succeeded meanwhile
	}
	if sl.refs == 0 {
		// Nobody holds it any more: no retry, the next holder tries anew.
		return
	}
	sl.retry = min(max(2*sl.retry, minRetry), maxRetry)
	ids.srv.log.Error("cannot mint svid; the caller gets its other identities and the bundle, retrying",
		"entry_id", sl.entry.ID, "spiffe_id", sl.entry.SpiffeID, "retry_in", sl.retry, "err", err)
	ids.scheduleLocked(sl, sl.retry)
}

// mintFailureReason is the reason label of meshid_svid_mint_failures_total.
func mintFailureReason(err error) string {
	var inv *InvalidArgumentError
	switch {
	case errors.As(err, &inv):
		return "invalid"
	case errors.Is(err, ErrSignBusy):
		return "busy"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "canceled"
	}
	return "other"
}
