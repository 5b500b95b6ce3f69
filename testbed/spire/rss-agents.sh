#!/usr/bin/env bash
# Server RSS per connected agent, SPIRE against meshid, alternating RUNS
# times: AGENTS agents with WORKLOADS entries each, held HOLD after all are
# up. SPIRE: v1.13.3 on sqlite3 with its rate limits off (its attestation
# limit is per IP and every simulated agent is on 127.0.0.1), the
# simulator in agents/. meshid: `meshid bench agents`. Needs MESHID (a
# meshid binary) and SPIRE_DIR (what build.sh printed).
set -euo pipefail
: "${MESHID:?a meshid binary}" "${SPIRE_DIR:?the directory build.sh printed}"
AGENTS=${AGENTS:-1000} WORKLOADS=${WORKLOADS:-10} HOLD=${HOLD:-30s} RUNS=${RUNS:-2}
DIR=$(mktemp -d)
trap 'pkill -f "$DIR" || true; rm -rf "$DIR"' EXIT
load() { cut -d' ' -f1 /proc/loadavg; }
run_spire() {
	local D="$DIR/spire"
	rm -rf "$D"
	mkdir -p "$D/data" "$D/s"
	"$(dirname "$0")/server-conf.sh" "$D" >"$D/server.conf"
	"$SPIRE_DIR/spire-server" run -config "$D/server.conf" >"$D/spire.log" 2>&1 &
	local pid=$!
	until "$SPIRE_DIR/spire-server" healthcheck -socketPath "$D/s/api.sock" >/dev/null 2>&1; do sleep 0.2; done
	echo "== SPIRE $(date -u +%H:%M:%S) load $(load)"
	"$SPIRE_DIR/spire-agents" -socket "$D/s/api.sock" -pid "$pid" -agents "$AGENTS" -workloads "$WORKLOADS" -hold "$HOLD" 2>&1 | grep -v '^agent '
	kill "$pid"
	wait "$pid" 2>/dev/null || true
}
run_meshid() {
	local D="$DIR/meshid"
	rm -rf "$D"
	mkdir -p "$D"
	"$MESHID" server --data-dir "$D/data" --admin-socket "$D/admin.sock" --socket "$D/w.sock" \
		--agent-listen 127.0.0.1:18705 --metrics-listen 127.0.0.1:18706 --log-level warn >"$D/server.log" 2>&1 &
	local pid=$!
	until [[ -S "$D/admin.sock" ]]; do sleep 0.2; done
	echo "== meshid $(date -u +%H:%M:%S) load $(load)"
	"$MESHID" bench agents --server 127.0.0.1:18705 --admin-socket "$D/admin.sock" --agents "$AGENTS" \
		--workloads "$WORKLOADS" --hold "$HOLD" --metrics-url http://127.0.0.1:18706/metrics 2>/dev/null
	kill "$pid"
	wait "$pid" 2>/dev/null || true
}
for _ in $(seq "$RUNS"); do
	run_spire
	run_meshid
done
