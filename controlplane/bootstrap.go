package controlplane

import (
	"context"
	"fmt"
	"time"

	"github.com/meshid/meshid/store"
)

// bootstrap makes what a store without state needs, the first CA and JWT
// key, and finishes a rotation a crash interrupted (two active CAs: the
// newer won). It writes only as the leader, so replicas starting together
// on an empty store do not each make a CA; it returns the leadership it
// took, if it needed one.
func (s *Server) bootstrap(ctx context.Context) (store.Leadership, error) {
	needs := func(recs []store.CARecord) bool {
		var x, j int
		for _, r := range recs {
			if r.State != store.CAActive {
				continue
			}
			switch r.Kind {
			case "x509":
				x++
			case "jwt":
				j++
			}
		}
		return x != 1 || j == 0
	}
	recs, err := s.store.ListCAs(ctx)
	if err != nil {
		return nil, fmt.Errorf("load CAs: %w", err)
	}
	if !needs(recs) {
		return nil, nil
	}
	lead, err := s.campaignUnlessBootstrapped(ctx, needs)
	if err != nil {
		return nil, err
	}
	if lead == nil {
		return nil, nil // another replica made what was missing
	}
	if recs, err = s.store.ListCAs(ctx); err != nil {
		lead.Resign(context.Background())
		return nil, fmt.Errorf("load CAs: %w", err)
	}
	if err := s.bootstrapLocked(ctx, recs); err != nil {
		lead.Resign(context.Background())
		return nil, err
	}
	return lead, nil
}

// campaignUnlessBootstrapped campaigns for the leadership until it is
// won, or until the store's CAs no longer need bootstrapping: replicas
// starting together on an empty store wait while the first to lead makes
// the CA, then start as followers instead of waiting for a leadership the
// winner keeps for as long as it runs. It returns nil, nil in that case.
func (s *Server) campaignUnlessBootstrapped(ctx context.Context, needs func([]store.CARecord) bool) (store.Leadership, error) {
	rev, err := s.store.Revision(ctx)
	if err != nil {
		return nil, fmt.Errorf("read store revision: %w", err)
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	w, err := s.store.Watch(wctx, rev)
	if err != nil {
		return nil, fmt.Errorf("watch the store for the first CA: %w", err)
	}
	defer func() {
		stop()
		for range w.Responses() { // drained so the watch's goroutine is gone
		}
	}()
	// Made between the first listing and the watch: seen here.
	if recs, err := s.store.ListCAs(ctx); err != nil {
		return nil, fmt.Errorf("load CAs: %w", err)
	} else if !needs(recs) {
		return nil, nil
	}
	type won struct {
		l   store.Leadership
		err error
	}
	cctx, cancelCampaign := context.WithCancel(ctx)
	defer cancelCampaign()
	res := make(chan won, 1)
	go func() { // ends with cctx at the latest; its result is read below
		l, err := s.store.Campaign(cctx)
		res <- won{l, err}
	}()
	for {
		select {
		case r := <-res:
			if r.err != nil {
				return nil, fmt.Errorf("campaign to make the first CA: %w", r.err)
			}
			return r.l, nil
		case resp, ok := <-w.Responses():
			if !ok {
				// The watch ended (compacted, closed): the campaign alone decides.
				r := <-res
				if r.err != nil {
					return nil, fmt.Errorf("campaign to make the first CA: %w", r.err)
				}
				return r.l, nil
			}
			touched := false
			for _, ev := range resp.Events {
				touched = touched || ev.Kind == store.KindCA
			}
			if !touched {
				continue
			}
			recs, err := s.store.ListCAs(ctx)
			if err != nil {
				return nil, fmt.Errorf("load CAs: %w", err)
			}
			if needs(recs) {
				continue
			}
			cancelCampaign()
			if r := <-res; r.err == nil {
				// Won just as the other replica finished: not needed.
				_ = r.l.Resign(context.Background())
			}
			s.log.Info("another replica made the first CA; starting as a follower")
			return nil, nil
		}
	}
}

func (s *Server) bootstrapLocked(ctx context.Context, recs []store.CARecord) error {
	active, err := s.repairActivation(ctx, recs)
	if err != nil {
		return err
	}
	hasJWT := false
	for _, r := range recs {
		hasJWT = hasJWT || (r.Kind == "jwt" && r.State == store.CAActive)
	}
	if active == nil {
		_, rec, err := s.newCA(s.kek, store.CAActive)
		if err != nil {
			return err
		}
		if err := s.store.PutCA(ctx, rec, &store.AuditEvent{
			Time: s.now(), Actor: "server", Action: "ca.create", Target: rec.ID,
			Detail: fmt.Sprintf("%s %s CA for %s, valid until %s", s.cfg.CAKeyType, caKind(rec), s.td, rec.NotAfter.UTC().Format(time.RFC3339)),
		}); err != nil {
			return fmt.Errorf("store new CA: %w", err)
		}
		s.log.Info("created CA", "id", rec.ID, "trust_domain", s.td.String(), "not_after", rec.NotAfter)
	}
	if !hasJWT {
		j, rec, err := s.newJWTKey(s.kek, store.CAActive)
		if err != nil {
			return err
		}
		if err := s.store.PutCA(ctx, rec, &store.AuditEvent{Time: rec.CreatedAt, Actor: "server", Action: "jwt.create", Target: rec.ID,
			Detail: fmt.Sprintf("ES256 kid %s valid until %s", j.KeyID, j.NotAfter.UTC().Format(time.RFC3339))}); err != nil {
			return fmt.Errorf("store JWT key: %w", err)
		}
		s.log.Info("created JWT signing key", "kid", j.KeyID, "not_after", j.NotAfter)
	}
	return nil
}

// repairActivation finishes an activation interrupted between its two
// writes (the successor made active, the old CA not yet retired): the
// newest active X.509 CA wins and the others are retired. It returns the
// one active CA, or nil if there is none.
func (s *Server) repairActivation(ctx context.Context, recs []store.CARecord) (*store.CARecord, error) {
	var active *store.CARecord
	for i, r := range recs {
		if r.Kind == "x509" && r.State == store.CAActive && (active == nil || !r.CreatedAt.Before(active.CreatedAt)) {
			active = &recs[i]
		}
	}
	for _, r := range recs {
		if r.Kind == "x509" && r.State == store.CAActive && r.ID != active.ID {
			r.State = store.CARetired
			if err := s.store.PutCA(ctx, r, &store.AuditEvent{Time: s.now(), Actor: "server", Action: "ca.retire",
				Target: r.ID, Detail: "repair: a rotation was interrupted after activating its successor"}); err != nil {
				return nil, fmt.Errorf("repair CA %s: %w", r.ID, err)
			}
			s.log.Warn("finished an interrupted CA rotation", "retired", r.ID, "active", active.ID)
		}
	}
	return active, nil
}
