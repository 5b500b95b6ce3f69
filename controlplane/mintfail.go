package controlplane

import (
	"context"
	"errors"
)

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
