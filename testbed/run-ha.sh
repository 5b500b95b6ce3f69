#!/usr/bin/env bash
# make run-ha: meshid highly available on one machine, in the foreground.
#   - a 3-member etcd on loopback (etcd from testbed/etcd/build.sh);
#   - 3 `meshid server --store etcd` replicas sharing one KEK;
#   - 1 `meshid agent` listing all three (--server a,b,c), joined with a
#     token made through replica 0's admin socket, serving the Workload
#     API and SDS on $DIR/agent/workload.sock.
# Every line of output is prefixed with its process ([e0] [r1] [agent]...).
# Ctrl-C stops everything (agent, replicas, then etcd) and keeps the state,
# so the next run resumes it; `rm -rf .run-ha` starts afresh.
#
# State under $MESHID_HA_DIR (default ./.run-ha). Fixed loopback ports:
#   etcd e0/e1/e2   client 127.0.0.1:22379/22479/22579, peer 22380/22480/22580
#   replica r0/r1/r2 agent API 127.0.0.1:18441/18442/18443,
#                    metrics (/metrics /healthz /readyz) 127.0.0.1:19091/19092/19093,
#                    admin socket $DIR/rN/admin/admin.sock
#   agent           metrics 127.0.0.1:19190, socket $DIR/agent/workload.sock
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
GO="${GO:-go}"
DIR="${MESHID_HA_DIR:-$root/.run-ha}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
N=3
ETCD_CLIENT=(22379 22479 22579)
ETCD_PEER=(22380 22480 22580)
AGENT_API=(18441 18442 18443)
METRICS=(19091 19092 19093)
AGENT_METRICS=19190

say() { echo "[run-ha] $*" >&2; }
die() { say "$*"; exit 1; }

# Every process we start, by pid: LABEL names them all, LIVE those not yet
# seen to exit. Only these pids are ever signalled.
declare -A LABEL=() LIVE=()
ORDER=()
# stop_group PREFIX: SIGTERM our processes whose label starts with PREFIX,
# wait for them, SIGKILL any still there after 20 s.
stop_group() {
	local p pids=()
	for p in "${ORDER[@]}"; do [[ "${LABEL[$p]}" == "$1"* && -n "${LIVE[$p]:-}" ]] && pids+=("$p"); done
	((${#pids[@]})) || return 0
	kill -TERM "${pids[@]}" 2>/dev/null || true
	(sleep 20 && kill -KILL "${pids[@]}" 2>/dev/null) &
	local killer=$!
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; unset "LIVE[$p]"; done
	kill "$killer" 2>/dev/null || true
}
stopping=0
stop_all() {
	((stopping)) && return
	stopping=1
	say "stopping"
	# The agent first (it would only retry), then the replicas, etcd last:
	# the replicas need it to give up the leader lease cleanly.
	stop_group agent
	stop_group r
	stop_group e
	say "stopped; state kept in $DIR (rm -rf it for a fresh start)"
}
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: CMD in the background in a session of its own (so the
# terminal's Ctrl-C reaches only this script, which stops them in order),
# its output prefixed with [NAME] by a sed that ignores SIGINT (a sed gone
# first would kill its writer with SIGPIPE).
start() {
	local name="$1"
	shift
	setsid "$@" > >(trap '' INT; exec sed -u "s/^/[$name] /") 2>&1 </dev/null &
	LABEL[$!]="$name"
	LIVE[$!]=1
	ORDER+=("$!")
	echo "$!" >"$DIR/$name.pid"
}

# wait_http URL WHAT: poll until URL answers 200, for 60 s.
wait_http() {
	local deadline=$((SECONDS + 60))
	until curl -fsS -o /dev/null "$1" 2>/dev/null; do
		((SECONDS < deadline)) || die "$2 did not answer $1 within 60 s (see its [..] lines above)"
		sleep 0.2
	done
}

for c in curl setsid; do command -v "$c" >/dev/null || die "$c is needed"; done
for p in "${ETCD_CLIENT[@]}" "${ETCD_PEER[@]}" "${AGENT_API[@]}" "${METRICS[@]}" "$AGENT_METRICS"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
		die "port 127.0.0.1:$p is in use (another make run-ha?); run-ha uses fixed ports, see testbed/run-ha.sh"
	fi
done

say "building meshid"
(cd "$root" && "$GO" build -o "$DIR/bin/meshid" ./cmd/meshid)
meshid="$DIR/bin/meshid"
if ! "$meshid" server --help 2>&1 | grep -q -- '--store'; then
	die "this meshid has no 'server --store' flag: the etcd store (issue 13) is not in this tree yet; run-ha needs it"
fi
etcd="$("$root/testbed/etcd/build.sh" | tail -n 1)"
say "etcd: $etcd ($("$etcd" --version | head -n 1))"

# One KEK for every replica: they unseal the same CA keys from etcd, and
# with --store etcd the server refuses to make one itself.
if [[ ! -s "$DIR/kek" ]]; then
	"$meshid" kek create "$DIR/kek" >/dev/null
	say "made the shared KEK $DIR/kek (meshid kek create)"
fi

cluster=""
for ((i = 0; i < N; i++)); do cluster+="${cluster:+,}e$i=http://127.0.0.1:${ETCD_PEER[i]}"; done
endpoints=""
for ((i = 0; i < N; i++)); do endpoints+="${endpoints:+,}http://127.0.0.1:${ETCD_CLIENT[i]}"; done
for ((i = 0; i < N; i++)); do
	start "e$i" "$etcd" --name "e$i" --data-dir "$DIR/etcd/e$i" \
		--listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" \
		--listen-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" \
		--initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token meshid-run-ha \
		--log-level warn
done
for ((i = 0; i < N; i++)); do wait_http "http://127.0.0.1:${ETCD_CLIENT[i]}/readyz" "etcd e$i"; done
say "etcd up: $endpoints"

for ((i = 0; i < N; i++)); do
	mkdir -p "$DIR/r$i"
	start "r$i" "$meshid" server --store etcd --etcd-endpoints "$endpoints" --etcd-prefix /meshid/ \
		--replica-id "r$i" --kek-file "$DIR/kek" --data-dir "$DIR/r$i/data" \
		--admin-socket "$DIR/r$i/admin/admin.sock" --socket= \
		--agent-listen "127.0.0.1:${AGENT_API[i]}" --metrics-listen "127.0.0.1:${METRICS[i]}"
done
for ((i = 0; i < N; i++)); do wait_http "http://127.0.0.1:${METRICS[i]}/readyz" "replica r$i"; done
say "replicas up"

servers=""
for ((i = 0; i < N; i++)); do servers+="${servers:+,}127.0.0.1:${AGENT_API[i]}"; done
agent=(agent --server "$servers" --data-dir "$DIR/agent/data" --socket "$DIR/agent/workload.sock"
	--metrics-listen "127.0.0.1:$AGENT_METRICS")
mkdir -p "$DIR/agent"
if [[ ! -f "$DIR/agent/data/node.crt" ]]; then
	# First start: a join token and the bundle, through replica 0 (any
	# replica would do: they share the store).
	"$meshid" token create --agent --node-id run-ha --ttl 10m --admin-socket "$DIR/r0/admin/admin.sock" >"$DIR/agent/join.token"
	"$meshid" bundle show --admin-socket "$DIR/r0/admin/admin.sock" >"$DIR/agent/bundle.pem"
	agent+=(--join-token-file "$DIR/agent/join.token" --trust-bundle "$DIR/agent/bundle.pem")
fi
start agent "$meshid" "${agent[@]}"
wait_http "http://127.0.0.1:$AGENT_METRICS/readyz" "the agent"

cat >&2 <<MSG
[run-ha] all up. In another terminal:
[run-ha]   export PATH=$DIR/bin:\$PATH
[run-ha]   for i in 0 1 2; do meshid status --admin-socket $DIR/r\$i/admin/admin.sock; done
[run-ha]     (every replica, which one leads, etcd health and revision)
[run-ha]   a workload:  SPIFFE_ENDPOINT_SOCKET=unix://$DIR/agent/workload.sock ...
[run-ha]   kill the leader (say it is r1): kill -9 \$(cat $DIR/r1.pid)
[run-ha]     and watch: meshid status --admin-socket $DIR/r0/admin/admin.sock
[run-ha]     another replica leads within --etcd-lease-ttl (10 s); the agent moves to a live one.
[run-ha]   lose the etcd quorum: kill \$(cat $DIR/e1.pid) \$(cat $DIR/e2.pid)
[run-ha]     writes are refused (Unavailable); workloads keep their SVIDs.
[run-ha] Ctrl-C stops everything.
MSG

# Until Ctrl-C: a process that exits (a replica killed for the demo) is
# reported, the rest keep running.
while ((${#LIVE[@]} > 0)); do
	done_pid=
	if wait -n -p done_pid "${!LIVE[@]}"; then rc=0; else rc=$?; fi
	[[ -n "$done_pid" ]] || break
	say "${LABEL[$done_pid]} (pid $done_pid) exited with status $rc"
	unset "LIVE[$done_pid]"
done
