package agent

import (
	"context"
	"time"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/meshid/meshid/proto/meshid/agent/v1"
)

// reportInterval is how often the agent looks at which bundle its callers
// hold; a report goes out only when that changed, so a bundle change
// reaches the server within about a second of the last proxy ACKing it,
// and an idle node sends nothing.
const reportInterval = time.Second

// bundleReport counts the node's streams that carry the trust bundle, by
// the version each holds (SDS: ACKed; Workload API: sent). Streams holding
// none yet count in Streams only.
func (a *Agent) bundleReport() *agentv1.BundleReport {
	r := &agentv1.BundleReport{StreamsByVersion: map[string]int32{}}
	ws := a.ws.Load()
	if ws == nil {
		return r
	}
	for v, n := range ws.BundleVersions() {
		r.Streams += int32(n)
		if v != "" {
			r.StreamsByVersion[v] = int32(n)
		}
	}
	return r
}

// reportLoop sends a BundleReport on the session's Sync stream at once and
// then whenever the counts change, at most once per reportInterval, until
// ctx (the session's) ends. A failed Send ends it: the session's Recv sees
// the same failure and reconnects, and the next session reports afresh.
func (a *Agent) reportLoop(ctx context.Context, stream agentv1.AgentService_SyncClient) {
	var last *agentv1.BundleReport
	for {
		if r := a.bundleReport(); last == nil || !proto.Equal(r, last) {
			if err := stream.Send(&agentv1.SyncRequest{Report: r}); err != nil {
				if ctx.Err() == nil {
					a.log.Debug("bundle report not sent", "err", err)
				}
				return
			}
			last = r
		}
		if !a.sleep(ctx, reportInterval) {
			return
		}
	}
}
