package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/attest"
	"github.com/meshid/meshid/ca"
	adminv1 "github.com/meshid/meshid/proto/meshid/admin/v1"
	"github.com/meshid/meshid/store"
)

// maxPageSize bounds the rows of one page, and maxPageBytes its encoded
// size, so a response stays far below gRPC's 4 MiB default message limit
// whatever the rows hold (entries stored by older versions had no size
// limits).
const (
	maxPageSize  = 5000
	maxPageBytes = 2 << 20
)

// boundedPage returns one page of at most n rows from list, cut short
// before maxPageBytes (but never empty while rows remain). A cut page is
// listed again with exactly the rows that fit, so its next token is the
// store's own, whatever form the backend gives it.
func boundedPage[T proto.Message](n int, list func(n int) ([]T, string, error)) ([]T, string, error) {
	rows, next, err := list(n)
	if err != nil {
		return nil, "", err
	}
	size := 0
	for i, r := range rows {
		// Field tag and length prefix of each repeated element.
		size += proto.Size(r) + 8
		if size > maxPageBytes && i > 0 {
			return list(i)
		}
	}
	return rows, next, nil
}

// AdminService implements the admin gRPC API on top of a Server.
type AdminService struct {
	adminv1.UnimplementedAdminServiceServer
	srv *Server
	log *slog.Logger
}

// NewAdminService returns the admin API of srv.
func NewAdminService(srv *Server) *AdminService {
	return &AdminService{srv: srv, log: srv.log}
}

// actor names the admin caller for the audit trail and inventory.
func actor(ctx context.Context) string {
	pc, err := attest.PeerCredFromContext(ctx)
	if err != nil {
		return "admin"
	}
	return fmt.Sprintf("admin(uid:%d pid:%d)", pc.UID, pc.PID)
}

// toStatus maps errors to gRPC codes. Internal details stay in the log.
func (a *AdminService) toStatus(op string, err error) error {
	var inv *InvalidArgumentError
	switch {
	case errors.As(err, &inv):
		return status.Error(codes.InvalidArgument, inv.Error())
	case errors.Is(err, store.ErrAlreadyExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.As(err, new(*FailedPreconditionError)):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ErrSignBusy):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, store.ErrUnavailable):
		// A full or failing disk: nothing was written and nothing issued;
		// the caller may retry once the store takes writes again. The store
		// logged the failure once; a line per refused call would flood.
		// The cause goes to the caller (an administrator): "etcd: no
		// quorum" and "disk full" call for different operators.
		return status.Error(codes.Unavailable, op+" refused: the server cannot write to its store ("+err.Error()+"); retry later")
	case errors.Is(err, store.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, store.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	}
	a.log.Error(op+" failed", "err", err)
	return status.Errorf(codes.Internal, "%s failed; see the server log", op)
}

func entryToProto(e store.Entry) *adminv1.Entry {
	pe := &adminv1.Entry{
		Id:        e.ID,
		SpiffeId:  e.SpiffeID,
		DnsNames:  e.DNSNames,
		CreatedAt: timestamppb.New(e.CreatedAt),
		Hint:      e.Hint,
		ParentId:  e.ParentID,
	}
	if e.TTL > 0 {
		pe.Ttl = durationpb.New(e.TTL)
	}
	for _, s := range e.Selectors {
		pe.Selectors = append(pe.Selectors, &adminv1.Selector{Type: s.Type, Value: s.Value})
	}
	return pe
}

// CreateEntry implements adminv1.AdminServiceServer.
func (a *AdminService) CreateEntry(ctx context.Context, req *adminv1.CreateEntryRequest) (*adminv1.CreateEntryResponse, error) {
	pe := req.GetEntry()
	if pe == nil {
		return nil, status.Error(codes.InvalidArgument, "entry is required")
	}
	if pe.GetId() != "" {
		return nil, status.Error(codes.InvalidArgument, "entry id is assigned by the server; leave it empty")
	}
	spec := EntrySpec{SpiffeID: pe.GetSpiffeId(), DNSNames: pe.GetDnsNames(), Hint: pe.GetHint(), ParentID: pe.GetParentId()}
	if pe.GetTtl() != nil {
		spec.TTL = pe.GetTtl().AsDuration()
	}
	for _, s := range pe.GetSelectors() {
		spec.Selectors = append(spec.Selectors, store.Selector{Type: s.GetType(), Value: s.GetValue()})
	}
	e, err := a.srv.CreateEntry(ctx, spec, actor(ctx))
	if err != nil {
		return nil, a.toStatus("create entry", err)
	}
	return &adminv1.CreateEntryResponse{Entry: entryToProto(e)}, nil
}

// DeleteEntry implements adminv1.AdminServiceServer.
func (a *AdminService) DeleteEntry(ctx context.Context, req *adminv1.DeleteEntryRequest) (*adminv1.DeleteEntryResponse, error) {
	e, revoked, err := a.srv.DeleteEntry(ctx, req.GetId(), actor(ctx))
	if err != nil {
		return nil, a.toStatus("delete entry", err)
	}
	resp := &adminv1.DeleteEntryResponse{Entry: entryToProto(e)}
	for _, r := range revoked {
		resp.RevokedSerials = append(resp.RevokedSerials, r.Serial)
	}
	return resp, nil
}

func pageSize(n int32) (int, error) {
	switch {
	case n < 0:
		return 0, status.Error(codes.InvalidArgument, "page size must not be negative")
	case n == 0 || n > maxPageSize:
		return maxPageSize, nil
	}
	return int(n), nil
}

// ListEntries implements adminv1.AdminServiceServer.
func (a *AdminService) ListEntries(ctx context.Context, req *adminv1.ListEntriesRequest) (*adminv1.ListEntriesResponse, error) {
	n, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	list := func(n int) ([]*adminv1.Entry, string, error) {
		entries, next, err := a.srv.ListEntries(ctx, store.EntryQuery{PageSize: n, PageToken: req.GetPageToken()})
		out := make([]*adminv1.Entry, len(entries))
		for i, e := range entries {
			out[i] = entryToProto(e)
		}
		return out, next, err
	}
	entries, next, err := boundedPage(n, list)
	if err != nil {
		return nil, a.toStatus("list entries", err)
	}
	return &adminv1.ListEntriesResponse{Entries: entries, NextPageToken: next}, nil
}

// GetEntry implements adminv1.AdminServiceServer.
func (a *AdminService) GetEntry(ctx context.Context, req *adminv1.GetEntryRequest) (*adminv1.GetEntryResponse, error) {
	e, err := a.srv.GetEntry(ctx, req.GetId())
	if err != nil {
		return nil, a.toStatus("get entry", err)
	}
	return &adminv1.GetEntryResponse{Entry: entryToProto(e)}, nil
}

// UpdateEntry implements adminv1.AdminServiceServer.
func (a *AdminService) UpdateEntry(ctx context.Context, req *adminv1.UpdateEntryRequest) (*adminv1.UpdateEntryResponse, error) {
	var u EntryUpdate
	for _, s := range req.GetSelectors() {
		u.Selectors = append(u.Selectors, store.Selector{Type: s.GetType(), Value: s.GetValue()})
	}
	if req.GetUpdateDnsNames() {
		dns := req.GetDnsNames()
		u.DNSNames = &dns
	}
	if req.GetTtl() != nil {
		ttl := req.GetTtl().AsDuration()
		u.TTL = &ttl
	}
	if req.Hint != nil {
		u.Hint = req.Hint
	}
	if req.ParentId != nil {
		u.ParentID = req.ParentId
	}
	e, err := a.srv.UpdateEntry(ctx, req.GetId(), u, actor(ctx))
	if err != nil {
		return nil, a.toStatus("update entry", err)
	}
	return &adminv1.UpdateEntryResponse{Entry: entryToProto(e)}, nil
}

// MintX509SVID implements adminv1.AdminServiceServer.
func (a *AdminService) MintX509SVID(ctx context.Context, req *adminv1.MintX509SVIDRequest) (*adminv1.MintX509SVIDResponse, error) {
	// A hand-minted server identity would let its holder pose as the server
	// to every remote proxy; meshid mints its own IDs itself.
	if req.GetSpiffeId() != "" {
		if err := a.srv.checkNotReserved(req.GetSpiffeId()); err != nil {
			return nil, a.toStatus("mint x509-svid", err)
		}
	}
	mr := MintRequest{
		SpiffeID:  req.GetSpiffeId(),
		CSR:       req.GetCsr(),
		DNSNames:  req.GetDnsNames(),
		Requester: actor(ctx),
	}
	if req.GetTtl() != nil {
		mr.TTL = req.GetTtl().AsDuration()
		if mr.TTL <= 0 {
			return nil, status.Error(codes.InvalidArgument, "ttl must be positive")
		}
	}
	if req.GetKeyType() != "" {
		if len(mr.CSR) > 0 {
			return nil, status.Error(codes.InvalidArgument, "key type applies only when the server makes the key; the CSR already carries one")
		}
		kt, err := ca.ParseKeyType(req.GetKeyType())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		mr.KeyType = kt
	}
	svid, err := a.srv.MintX509SVID(ctx, mr)
	if err != nil {
		return nil, a.toStatus("mint x509-svid", err)
	}
	resp := &adminv1.MintX509SVIDResponse{
		CertChain: append([][]byte{svid.CertDER}, svid.ChainDER...),
		Serial:    svid.Serial,
		NotBefore: timestamppb.New(svid.NotBefore),
		NotAfter:  timestamppb.New(svid.NotAfter),
		SpiffeId:  req.GetSpiffeId(),
	}
	if svid.Key != nil {
		der, err := marshalPKCS8(svid.Key)
		if err != nil {
			return nil, a.toStatus("mint x509-svid", err)
		}
		resp.PrivateKey = der
	}
	for _, c := range a.srv.BundleCerts() {
		resp.Bundle = append(resp.Bundle, c.Raw)
	}
	return resp, nil
}

// GetBundle implements adminv1.AdminServiceServer.
func (a *AdminService) GetBundle(ctx context.Context, _ *adminv1.GetBundleRequest) (*adminv1.GetBundleResponse, error) {
	b, err := a.srv.SPIFFEBundle()
	if err != nil {
		return nil, a.toStatus("get bundle", err)
	}
	resp := &adminv1.GetBundleResponse{TrustDomain: a.srv.td.Name()}
	for _, c := range b.X509Authorities() {
		resp.X509Authorities = append(resp.X509Authorities, c.Raw)
	}
	if seq, ok := b.SequenceNumber(); ok {
		resp.SequenceNumber = seq
	}
	js, err := b.Marshal()
	if err != nil {
		return nil, a.toStatus("get bundle", fmt.Errorf("marshal spiffe bundle: %w", err))
	}
	resp.SpiffeBundleJson = js
	return resp, nil
}

func caToProto(v *caView) *adminv1.CA {
	return &adminv1.CA{
		Id:          v.rec.ID,
		State:       string(v.rec.State),
		Subject:     v.cert.Subject.String(),
		NotBefore:   timestamppb.New(v.cert.NotBefore),
		NotAfter:    timestamppb.New(v.cert.NotAfter),
		Fingerprint: ca.Fingerprint(v.cert),
		KeyType:     keyTypeOf(v.cert),
		CertDer:     v.cert.Raw,
	}
}

// ListCAs implements adminv1.AdminServiceServer.
func (a *AdminService) ListCAs(ctx context.Context, _ *adminv1.ListCAsRequest) (*adminv1.ListCAsResponse, error) {
	a.srv.mu.RLock()
	views := a.srv.cas
	a.srv.mu.RUnlock()
	resp := &adminv1.ListCAsResponse{}
	now := a.srv.now()
	for _, v := range views {
		if v.inBundle(now) {
			c := a.caWithServed(v)
			if v.rec.State == store.CAPrepared {
				c.ActivationHeld = a.srv.heldReasonFor(v.rec.ID)
			}
			resp.Cas = append(resp.Cas, c)
		}
	}
	return resp, nil
}

// caWithServed is caToProto with the count of served SVIDs v signed: a
// rotation's progress.
func (a *AdminService) caWithServed(v *caView) *adminv1.CA {
	c := caToProto(v)
	c.ServedSvids = uint64(a.srv.servedBy(v.cert))
	return c
}

// RotateCA implements adminv1.AdminServiceServer.
func (a *AdminService) RotateCA(ctx context.Context, req *adminv1.RotateCARequest) (*adminv1.RotateCAResponse, error) {
	res, err := a.srv.RotateCANow(ctx, actor(ctx), req.GetDropOld())
	if err != nil {
		return nil, a.toStatus("rotate CA", err)
	}
	nv, ov := a.srv.caByID(res.Active.ID), a.srv.caByID(res.Old.ID)
	if nv == nil || ov == nil {
		return nil, a.toStatus("rotate CA", errors.New("rotated CA vanished"))
	}
	return &adminv1.RotateCAResponse{Ca: a.caWithServed(nv), Old: a.caWithServed(ov), Reissuing: uint64(res.Reissuing)}, nil
}

// ActivateCA implements adminv1.AdminServiceServer.
func (a *AdminService) ActivateCA(ctx context.Context, req *adminv1.ActivateCARequest) (*adminv1.ActivateCAResponse, error) {
	rec, err := a.srv.ActivateCA(ctx, actor(ctx), req.GetForce())
	if err != nil {
		return nil, a.toStatus("activate CA", err)
	}
	if v := a.srv.caByID(rec.ID); v != nil {
		return &adminv1.ActivateCAResponse{Ca: caToProto(v)}, nil
	}
	return nil, a.toStatus("activate CA", errors.New("activated CA vanished"))
}

// PrepareCA implements adminv1.AdminServiceServer.
func (a *AdminService) PrepareCA(ctx context.Context, _ *adminv1.PrepareCARequest) (*adminv1.PrepareCAResponse, error) {
	rec, err := a.srv.PrepareCA(ctx, actor(ctx))
	if err != nil {
		return nil, a.toStatus("prepare CA", err)
	}
	if v := a.srv.caByID(rec.ID); v != nil {
		return &adminv1.PrepareCAResponse{Ca: caToProto(v)}, nil
	}
	return nil, a.toStatus("prepare CA", errors.New("prepared CA vanished"))
}

// ListCerts implements adminv1.AdminServiceServer.
func (a *AdminService) ListCerts(ctx context.Context, req *adminv1.ListCertsRequest) (*adminv1.ListCertsResponse, error) {
	n, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	now := a.srv.now()
	q := store.SVIDQuery{PageSize: n, PageToken: req.GetPageToken()}
	if !req.GetIncludeExpired() {
		q.NotExpiredAt = now
	}
	if w := req.GetExpiringWithin(); w != nil {
		if w.AsDuration() < 0 {
			return nil, status.Error(codes.InvalidArgument, "expiring-within must not be negative")
		}
		if w.AsDuration() > 0 {
			q.ExpiringBefore = now.Add(w.AsDuration())
		}
	}
	list := func(n int) ([]*adminv1.IssuedCert, string, error) {
		q := q
		q.PageSize = n
		rows, next, err := a.srv.store.ListSVIDs(ctx, q)
		out := make([]*adminv1.IssuedCert, len(rows))
		for i, r := range rows {
			out[i] = &adminv1.IssuedCert{
				Serial:    r.Serial,
				SpiffeId:  r.SpiffeID,
				NotBefore: timestamppb.New(r.NotBefore),
				NotAfter:  timestamppb.New(r.NotAfter),
				EntryId:   r.EntryID,
				Requester: r.Requester,
				CaId:      r.CAID,
				IssuedAt:  timestamppb.New(r.IssuedAt),
			}
		}
		return out, next, err
	}
	certs, next, err := boundedPage(n, list)
	if err != nil {
		return nil, a.toStatus("list certs", err)
	}
	return &adminv1.ListCertsResponse{Certs: certs, NextPageToken: next}, nil
}

// CreateJoinToken implements adminv1.AdminServiceServer.
func (a *AdminService) CreateJoinToken(ctx context.Context, req *adminv1.CreateJoinTokenRequest) (*adminv1.CreateJoinTokenResponse, error) {
	if req.GetTtl() == nil {
		return nil, status.Error(codes.InvalidArgument, "ttl is required")
	}
	var (
		secret string
		t      store.JoinToken
		err    error
	)
	switch {
	case req.GetAgent() && req.GetSpiffeId() != "":
		return nil, status.Error(codes.InvalidArgument, "an agent token grants the agent's own ID: give --node-id, not --spiffe-id")
	case req.GetAgent():
		secret, t, err = a.srv.CreateAgentToken(ctx, req.GetNodeId(), req.GetTtl().AsDuration(), actor(ctx))
	case req.GetNodeId() != "":
		return nil, status.Error(codes.InvalidArgument, "--node-id is for agent tokens (--agent)")
	default:
		secret, t, err = a.srv.CreateJoinToken(ctx, req.GetSpiffeId(), req.GetTtl().AsDuration(), req.GetSingleUse(), actor(ctx))
	}
	if err != nil {
		return nil, a.toStatus("create join token", err)
	}
	return &adminv1.CreateJoinTokenResponse{Token: secret, SpiffeId: t.SpiffeID, ExpiresAt: timestamppb.New(t.ExpiresAt), SingleUse: t.SingleUse}, nil
}

// Revoke implements adminv1.AdminServiceServer.
func (a *AdminService) Revoke(ctx context.Context, req *adminv1.RevokeRequest) (*adminv1.RevokeResponse, error) {
	res, err := a.srv.Revoke(ctx, req.GetSpiffeId(), req.GetSerial(), actor(ctx))
	if err != nil {
		return nil, a.toStatus("revoke", err)
	}
	resp := &adminv1.RevokeResponse{}
	for _, r := range res.Serials {
		resp.Serials = append(resp.Serials, r.Serial)
	}
	for _, e := range res.DeletedEntries {
		resp.DeletedEntryIds = append(resp.DeletedEntryIds, e.ID)
	}
	return resp, nil
}

// GetServerInfo implements adminv1.AdminServiceServer.
func (a *AdminService) GetServerInfo(context.Context, *adminv1.GetServerInfoRequest) (*adminv1.GetServerInfoResponse, error) {
	return &adminv1.GetServerInfoResponse{
		Version:     a.srv.cfg.Version,
		TrustDomain: a.srv.td.Name(),
		StartedAt:   timestamppb.New(a.srv.startedAt),
	}, nil
}

// Node agents (agents.go).

func agentToProto(a AgentInfo) *adminv1.Agent {
	p := &adminv1.Agent{Id: a.ID, Method: a.Method, Node: a.Node, Banned: a.Banned, Streams: int32(a.Streams), Selectors: a.Selectors}
	ts := func(t time.Time) *timestamppb.Timestamp {
		if t.IsZero() {
			return nil
		}
		return timestamppb.New(t)
	}
	p.FirstSeen, p.LastSeen, p.SvidExpiresAt, p.BannedAt = ts(a.FirstSeen), ts(a.LastSeen), ts(a.SVIDExpiry()), ts(a.BannedAt)
	return p
}

// ListAgents implements adminv1.AdminServiceServer.
func (a *AdminService) ListAgents(ctx context.Context, _ *adminv1.ListAgentsRequest) (*adminv1.ListAgentsResponse, error) {
	list, err := a.srv.ListAgents(ctx)
	if err != nil {
		return nil, a.toStatus("list agents", err)
	}
	resp := &adminv1.ListAgentsResponse{Agents: make([]*adminv1.Agent, 0, len(list))}
	for _, ag := range list {
		resp.Agents = append(resp.Agents, agentToProto(ag))
	}
	return resp, nil
}

// GetAgent implements adminv1.AdminServiceServer.
func (a *AdminService) GetAgent(ctx context.Context, req *adminv1.GetAgentRequest) (*adminv1.GetAgentResponse, error) {
	ag, err := a.srv.GetAgent(ctx, req.GetId())
	if err != nil {
		return nil, a.toStatus("get agent", err)
	}
	return &adminv1.GetAgentResponse{Agent: agentToProto(ag)}, nil
}

// EvictAgent implements adminv1.AdminServiceServer.
func (a *AdminService) EvictAgent(ctx context.Context, req *adminv1.EvictAgentRequest) (*adminv1.EvictAgentResponse, error) {
	old, err := a.srv.EvictAgent(ctx, req.GetId(), actor(ctx))
	if err != nil {
		return nil, a.toStatus("evict agent", err)
	}
	return &adminv1.EvictAgentResponse{Agent: agentToProto(AgentInfo{AgentRecord: old})}, nil
}

// BanAgent implements adminv1.AdminServiceServer.
func (a *AdminService) BanAgent(ctx context.Context, req *adminv1.BanAgentRequest) (*adminv1.BanAgentResponse, error) {
	ag, serials, err := a.srv.BanAgent(ctx, req.GetId(), actor(ctx))
	if err != nil {
		return nil, a.toStatus("ban agent", err)
	}
	resp := &adminv1.BanAgentResponse{Agent: agentToProto(ag)}
	for _, r := range serials {
		resp.RevokedSerials = append(resp.RevokedSerials, r.Serial)
	}
	return resp, nil
}

// UnbanAgent implements adminv1.AdminServiceServer.
func (a *AdminService) UnbanAgent(ctx context.Context, req *adminv1.UnbanAgentRequest) (*adminv1.UnbanAgentResponse, error) {
	ag, err := a.srv.UnbanAgent(ctx, req.GetId(), actor(ctx))
	if err != nil {
		return nil, a.toStatus("unban agent", err)
	}
	return &adminv1.UnbanAgentResponse{Agent: agentToProto(ag)}, nil
}
