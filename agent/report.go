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

// reportLoop reports the node's BundleReport (ReportBundles) at once and
// then whenever the counts change, at most once per reportInterval, until
// ctx (the session's) ends. Each call is made with the counts of the
// moment and waited for, so at most one is in flight and the server holds
// the latest; one that fails is made again at the next tick with the
// counts then. The session calls it once its Sync stream delivered its
// first response: a report applies to an open stream, and every new
// stream (a reconnect, another replica) gets the current counts afresh.
func (a *Agent) reportLoop(ctx context.Context, client agentv1.AgentServiceClient) {
	var last *agentv1.BundleReport
	for {
		if r := a.bundleReport(); last == nil || !proto.Equal(r, last) {
			_, err := client.ReportBundles(ctx, &agentv1.ReportBundlesRequest{Report: r})
			switch {
			case err == nil:
				last = r
			case ctx.Err() != nil:
				return
			default:
				a.log.Debug("bundle report not taken; retrying", "err", err)
			}
		}
		if !a.sleep(ctx, reportInterval) {
			return
		}
	}
}
