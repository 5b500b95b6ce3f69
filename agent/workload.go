package agent

import (
	"context"
	"fmt"
	"slices"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/identity"
	"github.com/meshid/meshid/kube/podattest"
)

// startWorkloadAttestors returns the attestors the workload socket runs:
// nil (the built-in ones) without Kubernetes; with Config.Pods, the unix
// attestor and the k8s one, whose informer runs until stop is called and
// has listed this node's pods before this returns.
func (a *Agent) startWorkloadAttestors(ctx context.Context) (set *attest.Set, stop func(), err error) {
	if a.cfg.Pods == nil {
		return nil, func() {}, nil
	}
	cfg := *a.cfg.Pods
	if cfg.Logger == nil {
		cfg.Logger = a.log
	}
	next := cfg.OnChange
	cfg.OnChange = func(uid string) {
		a.podChanged(uid)
		if next != nil {
			next(uid)
		}
	}
	pods, err := podattest.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	if err := pods.Start(ctx); err != nil {
		return nil, nil, fmt.Errorf("k8s workload attestor: %w", err)
	}
	set, err = attest.NewSet(attest.Unix{}, pods)
	if err != nil {
		pods.Close()
		return nil, nil, err
	}
	return set, pods.Close, nil
}

// podChanged ends, at once, the streams of every caller attested to pod
// uid whose attestation no longer holds (the pod was deleted, or the
// caller's container left its status): they serve nothing more and their
// SVIDs are not renewed. Without this a stream would learn it only at its
// next send, which for an idle one is the next renewal.
func (a *Agent) podChanged(uid string) {
	sel := "k8s:pod-uid:" + uid
	n := a.cache.EndCallers(func(c identity.Caller) bool {
		return slices.Contains(c.Selectors, sel) && c.Recheck() != nil
	}, func(c identity.Caller) error {
		if err := c.Recheck(); err != nil {
			return err
		}
		return podattest.ErrPodGone
	})
	if n > 0 {
		a.log.Info("pod gone: its workloads' identities withdrawn", "pod_uid", uid, "subscriptions", n)
	}
}
