package bench

import "time"

// AgentsConfig describes a node-agent load: one process speaking the agent
// API (proto/meshid/agent/v1) as many agents at once, each as `meshid
// agent` does: Attest with an agent join token, then over mTLS with the
// node SVID one Sync stream and SignX509SVIDs batches.
type AgentsConfig struct {
	// Server is the agent API, host:port (meshid server --agent-listen).
	Server string
	// AdminSocket is the server's admin API, used to set the run up
	// (tokens, entries) and to trigger the fan-out.
	AdminSocket string
	// MetricsURL is the server's /metrics, scraped before the agents
	// connect, once all hold their Sync streams (and SVIDs), and at the end.
	MetricsURL string
	Agents     int
	// Workloads is how many entries each agent is entitled to.
	Workloads int
	// Shared makes Workloads entries without a parent (every agent may
	// serve all of them) instead of Workloads entries per agent, each with
	// that agent as --parent-id.
	Shared bool
	// Concurrency bounds the agents in their cold start (attest to last
	// SVID) at once; 0 means 64.
	Concurrency int
	// SetupConcurrency bounds the admin calls of the set-up; 0 means 16.
	SetupConcurrency int
	// NodePrefix names the agents <prefix>-<i>; empty means bench-<random>,
	// so that entries a previous run made for its agents are not served
	// to this run's.
	NodePrefix string
	// Fanout is FanoutRevoke (default), FanoutPrepare or FanoutNone.
	Fanout string
	// Timeout bounds the cold start and, separately, the fan-out; 0 means
	// 2 minutes.
	Timeout time.Duration
	// Hold keeps the streams open (idle) for this long after the fan-out,
	// before the last scrape.
	Hold time.Duration
	// KeygenInline makes every agent's keys and CSRs on the clock, in its
	// cold start. By default they are made before the clock starts, so the
	// figure measures the server, not the load generator sharing its CPUs.
	KeygenInline bool
	// VerifyInventory pages through the inventory afterwards and checks
	// that every serial issued is recorded for its entry.
	VerifyInventory bool
	// Progress, if set, is called about once a second with a status line.
	Progress func(line string)
}

// AgentsResult is what a node-agent load measured.
type AgentsResult struct {
	Agents     int    `json:"agents"`
	Workloads  int    `json:"workloads"`
	Mode       string `json:"mode"` // "per-agent" or "shared"
	NodePrefix string `json:"node_prefix"`
	// Entries are those the set-up made.
	Entries int `json:"entries"`
	// Setup is the admin calls making the tokens and entries; KeyPrep the
	// keys and CSRs made before the clock (zero with KeygenInline).
	Setup   time.Duration `json:"setup_ns"`
	KeyPrep time.Duration `json:"key_prep_ns"`
	// ColdStart is from the first Attest to the last SVID signed.
	ColdStart AgentsColdStart `json:"cold_start"`
	Metrics   *AgentsMetrics  `json:"metrics,omitempty"`
	Fanout    *FanoutResult   `json:"fanout,omitempty"`
	// ForeignEntries are entries served to the agents that this run did
	// not make (entries without a parent already on the server), summed
	// over the agents. They are not signed.
	ForeignEntries   int    `json:"foreign_entries"`
	InventoryChecked int    `json:"inventory_checked"`
	Errors           int64  `json:"errors"`
	FirstError       string `json:"first_error,omitempty"`
	// Elapsed is the whole run, set-up included.
	Elapsed time.Duration `json:"elapsed_ns"`
	// Details has one row per agent (for tests; not in the JSON output).
	Details []AgentDetail `json:"-"`
}

// AgentsColdStart is the cold start's figures.
type AgentsColdStart struct {
	Elapsed time.Duration `json:"elapsed_ns"`
	// Attested agents got a node SVID, Synced ones a Sync stream with all
	// their entries, Ready ones an SVID for every entry.
	Attested        int     `json:"attested"`
	Synced          int     `json:"synced"`
	Ready           int     `json:"ready"`
	SVIDs           int     `json:"svids"`
	AgentsPerSecond float64 `json:"agents_per_second"`
	SVIDsPerSecond  float64 `json:"svids_per_second"`
	// Per agent: the Attest call, from the mTLS dial to the Sync stream
	// holding all entries, the SignX509SVIDs batches, and all of it (from
	// the agent's start, not counting its wait for a concurrency slot).
	Attest Latency `json:"attest"`
	Sync   Latency `json:"sync"`
	Sign   Latency `json:"sign"`
	Total  Latency `json:"total"`
}

// AgentsMetrics are the server's figures around the load.
type AgentsMetrics struct {
	Before ServerSample `json:"before"`
	// Up is scraped once every agent holds its Sync stream and SVIDs; End
	// after the fan-out and Hold, just before the streams close.
	Up          ServerSample `json:"up"`
	End         ServerSample `json:"end"`
	PerAgentUp  PerStream    `json:"per_agent_up"`
	PerAgentEnd PerStream    `json:"per_agent_end"`
}

// FanoutResult is what the bundle fan-out measured.
type FanoutResult struct {
	Trigger string `json:"trigger"`
	// Serial is the SVID revoked (FanoutRevoke).
	Serial string `json:"serial,omitempty"`
	// Call is the admin call's own latency.
	Call time.Duration `json:"call_ns"`
	// Targets are the agents holding a Sync stream when the call was made;
	// Got how many of them received a bundle of a new version, Checked
	// how many of those bundles carry the change (the revoked serial on a
	// CRL; one more CA).
	Targets int `json:"targets"`
	Got     int `json:"got"`
	Checked int `json:"checked"`
	// FromReturn is from the admin call's return to each agent's new
	// bundle (0 for one that came before the call returned); FromStart
	// from the call's start.
	FromReturn Latency `json:"from_return"`
	FromStart  Latency `json:"from_start"`
}

// AgentDetail is what one simulated agent saw.
type AgentDetail struct {
	NodeID   string
	SpiffeID string
	// Entries are the IDs of this run's entries the agent was sent;
	// Serials the SVIDs it was issued, by entry ID.
	Entries []string
	Serials map[string]string
	// FanoutVersion is the bundle version that ended the fan-out for it.
	FanoutVersion string
}
