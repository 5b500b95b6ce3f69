package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/big"
	"time"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// verifyServer checks the server's certificate as the agent does: an SVID
// of the trust domain under the bundle, naming the server.
func (r *agentsRun) verifyServer(raw [][]byte, _ [][]*x509.Certificate) error {
	var certs []*x509.Certificate
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("server certificate: %w", err)
		}
		certs = append(certs, c)
	}
	id, _, err := x509svid.Verify(certs, r.trust)
	if err != nil {
		return fmt.Errorf("server certificate is not an SVID of %s under the bundle: %w", r.td, err)
	}
	if id != r.serverID {
		return fmt.Errorf("server certificate names %s, not %s", id, r.serverID)
	}
	return nil
}

// agentDial opens a connection to the agent API, with cert as the client
// certificate (none for Attest). Buffers are kept small, as in the SDS
// load: a thousand connections in one process.
func (r *agentsRun) agentDial(cert *tls.Certificate) (*grpc.ClientConn, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verified by VerifyPeerCertificate, against the SPIFFE ID.
		InsecureSkipVerify:    true, //nolint:gosec
		VerifyPeerCertificate: r.verifyServer,
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return grpc.NewClient("passthrough:///"+r.cfg.Server,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(4096))
}

// runAgent is one agent's life: attest, open Sync and wait for all its
// entries, sign an SVID for each, release its slot; then hold the stream,
// watching for the fan-out's bundle, until ctx ends.
func (r *agentsRun) runAgent(ctx context.Context, a *simAgent, slot func()) {
	released := false
	release := func() {
		if !released {
			released = true
			r.settled.Add(1)
			slot()
		}
	}
	defer release()
	fail := func(format string, args ...any) {
		if ctx.Err() == nil {
			r.fail("agent "+a.node+": "+format, args...)
		}
	}
	t0 := time.Now()
	if a.nodeKey == nil {
		if err := a.makeKeys(r.cfg.Workloads); err != nil {
			fail("%v", err)
			return
		}
	}

	// Attest: TLS authenticating the server only; the proof is the token.
	cc, err := r.agentDial(nil)
	if err != nil {
		fail("dial: %v", err)
		return
	}
	resp, err := agentv1.NewAgentServiceClient(cc).Attest(ctx, &agentv1.AttestRequest{Method: "join_token", Payload: []byte(a.token), Csr: a.nodeCSR})
	cc.Close()
	if err != nil {
		fail("attest: %v", err)
		return
	}
	cert, err := nodeCert(a.nodeKey, resp.GetSvidChain(), a.id)
	if err != nil {
		fail("%v", err)
		return
	}
	a.noteBundle(resp.GetBundle())
	r.attested.Add(1)
	t1 := time.Now()

	cc, err = r.agentDial(cert)
	if err != nil {
		fail("dial: %v", err)
		return
	}
	defer cc.Close()
	client := agentv1.NewAgentServiceClient(cc)
	stream, err := client.Sync(ctx, &agentv1.SyncRequest{})
	if err != nil {
		fail("sync: %v", err)
		return
	}
	// Responses until every entry this run made for the agent is in.
	held := map[string]bool{}
	for len(held) < len(a.expected) {
		msg, err := stream.Recv()
		if err != nil {
			fail("sync: %v", err)
			return
		}
		if msg.GetFull() {
			clear(held)
			a.foreign = 0
		}
		for _, e := range msg.GetEntries() {
			switch {
			case a.expected[e.GetId()]:
				held[e.GetId()] = true
			case r.entryByID[e.GetId()].id != "":
				fail("sent entry %s, made for another agent (parent %s)", e.GetId(), e.GetParentId())
				return
			default:
				a.foreign++
			}
		}
		for _, id := range msg.GetDeletedEntryIds() {
			delete(held, id)
		}
		if b := msg.GetBundle(); b != nil {
			a.noteBundle(b)
		}
	}
	r.synced.Add(1)
	t2 := time.Now()

	// One CSR per entry, as few batches as the server allows.
	ids := make([]string, 0, len(held))
	for id := range held {
		ids = append(ids, id)
	}
	for lo := 0; lo < len(ids); lo += maxSignBatch {
		batch := ids[lo:min(lo+maxSignBatch, len(ids))]
		req := &agentv1.SignX509SVIDsRequest{}
		for k, id := range batch {
			req.Csrs = append(req.Csrs, &agentv1.CSRForEntry{EntryId: id, Csr: a.csrs[lo+k]})
		}
		out, err := client.SignX509SVIDs(ctx, req)
		if err != nil {
			fail("sign: %v", err)
			return
		}
		if len(out.GetSvids()) != len(batch) {
			fail("sign: %d answers for %d CSRs", len(out.GetSvids()), len(batch))
			return
		}
		for k, s := range out.GetSvids() {
			id := batch[k]
			if s.GetCode() != 0 || s.GetEntryId() != id {
				fail("sign entry %s: code %d: %s (answer for %s)", id, s.GetCode(), s.GetMessage(), s.GetEntryId())
				return
			}
			serial, err := checkSVID(s.GetSvidChain(), a.keys[lo+k], r.entryByID[id].spiffeID)
			if err != nil {
				fail("entry %s: %v", id, err)
				return
			}
			a.serials[id] = serial
			r.svids.Add(1)
		}
	}
	t3 := time.Now()
	// As meshid agent does once its stream is up: report which bundle its
	// callers hold (here one proxy per entry, all on the bundle held), so
	// the server keeps what it keeps for a real agent.
	a.mu.Lock()
	v := a.bundleVersion
	a.mu.Unlock()
	n := int32(len(ids))
	if _, err := client.ReportBundles(ctx, &agentv1.ReportBundlesRequest{Report: &agentv1.BundleReport{Streams: n, StreamsByVersion: map[string]int32{v: n}}}); err != nil {
		fail("report: %v", err)
		return
	}
	a.attest, a.sync, a.sign, a.total = t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t3.Sub(t0)
	a.entries = ids
	a.mu.Lock()
	a.ready = true // read under mu: a timed-out run reads while agents still run
	a.mu.Unlock()
	r.ready.Add(1)
	r.lastReady.Store(t3.UnixNano())
	release()

	// Hold the stream: every bundle after the fan-out is armed is checked
	// once.
	for {
		msg, err := stream.Recv()
		if err != nil {
			fail("sync: %v", err)
			return
		}
		if b := msg.GetBundle(); b != nil {
			r.bundleArrived(a, b)
		}
	}
}

func (a *simAgent) isReady() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ready
}

// noteBundle records the bundle an agent holds before the fan-out.
func (a *simAgent) noteBundle(b *agentv1.Bundle) {
	if b == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.bundleVersion, a.authorities = b.GetVersion(), len(b.GetX509Authorities())
}

// bundleArrived handles a bundle on a held stream: the first new version
// after the fan-out was armed ends the agent's wait.
func (r *agentsRun) bundleArrived(a *simAgent, b *agentv1.Bundle) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.bundleVersion
	prevCAs := a.authorities
	a.bundleVersion, a.authorities = b.GetVersion(), len(b.GetX509Authorities())
	if r.fanStart.Load() == 0 || !a.fanAt.IsZero() || b.GetVersion() == old {
		return
	}
	a.fanAt, a.fanVersion = now, b.GetVersion()
	switch r.cfg.Fanout {
	case FanoutRevoke:
		serial, _ := r.fanSerial.Load().(*big.Int)
		a.fanChecked = serial != nil && crlsList(b.GetCrls(), serial)
	case FanoutPrepare:
		a.fanChecked = len(b.GetX509Authorities()) > prevCAs
	}
	r.fanGot.Add(1)
	r.fanArrived <- struct{}{}
}

// crlsList reports whether one of the CRLs lists serial.
func crlsList(crls [][]byte, serial *big.Int) bool {
	for _, der := range crls {
		l, err := x509.ParseRevocationList(der)
		if err != nil {
			continue
		}
		for _, e := range l.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(serial) == 0 {
				return true
			}
		}
	}
	return false
}
