#!/usr/bin/env bash
# Benchmarks of issue 13 (replicas on etcd) with real processes; see
# BENCHMARKS.md, "Replicas on etcd (issue 13)". Not part of `make test`.
#
#   testbed/bench-ha.sh mint      # bench mint: 1 replica on a 3-member etcd,
#                                 # spread over 3 replicas, bolt, and SPIRE
#                                 # when $SPIRE and $SPIRE_LOAD are set (spire-server and spire-mintload from testbed/spire/build.sh);
#                                 # MINT_KINDS picks and orders them
#                                 # ("etcd spire bolt etcd3"; "old" is 1
#                                 # replica run by the binary $MESHID_OLD),
#                                 # CLIENTS the -c values ("8 32"), and
#                                 # BENCH_LOCK a file each timed run holds
#                                 # with flock
#   testbed/bench-ha.sh failover  # kill -9 the leader, time the first
#                                 # `ca prepare|activate` that succeeds
#
# etcd runs with fsync on, each member with its own data dir, on loopback
# ports 23379/23479/23579 (peers +1). State under $BENCH_HA_DIR (default: a
# fresh mktemp -d directory, so nobody else's pre-made /tmp path holds the
# binary it runs or the KEK), wiped before every run. Tunables: RUNS (3),
# N (20000), TTLS ("10 3"), FAILOVERS (3), and for mint ETCD_CPUS and
# MINT_CPUS: taskset -c lists for the etcd members and for everything on
# the mint path (meshid or SPIRE server, and the load client), so etcd can
# be given its own core as it has its own machines in production.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${BENCH_HA_DIR:-}" ]]; then
	DIR="$BENCH_HA_DIR"
	mkdir -p -m 0700 "$DIR"
	# It will hold a binary run as this user and a KEK: only ours.
	if [[ "$(stat -c %u "$DIR")" != "$(id -u)" ]] || [[ -n "$(find "$DIR" -maxdepth 0 -perm /022)" ]]; then
		echo "bench-ha: $DIR is not owned by $(id -un) or is writable by others; refusing" >&2
		exit 1
	fi
else
	DIR="$(mktemp -d "${TMPDIR:-/tmp}/meshid-bench-ha.XXXXXX")"
fi
RUNS="${RUNS:-3}"
N="${N:-20000}"
ETCD_CLIENT=(23379 23479 23579)
ETCD_PEER=(23380 23480 23580)
mkdir -p "$DIR/bin"
meshid="$DIR/bin/meshid"
(cd "$root" && go build -o "$meshid" ./cmd/meshid)
etcd="${MESHID_ETCD_BIN:-$("$root/testbed/k8s/build.sh" | tail -n 1)/etcd}"

# pin VAR: the taskset prefix that pins a command to the CPUs in $VAR, or
# nothing. A prefix, not a wrapper function, so `$(pin V) cmd &` leaves
# the command's own pid in $! (taskset execs it).
pin() { if [[ -n "${!1:-}" ]]; then echo "taskset -c ${!1}"; fi; }
stamp() { echo "=== $* $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"; }
# timed CMD...: one timed run, holding $BENCH_LOCK if set, the load after it.
timed() {
	if [[ -n "${BENCH_LOCK:-}" ]]; then flock "$BENCH_LOCK" "$@"; else "$@"; fi
	echo "=== after $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

endpoints=""
for i in 0 1 2; do endpoints+="${endpoints:+,}http://127.0.0.1:${ETCD_CLIENT[i]}"; done

etcd_up() { # a fresh 3-member cluster
	local cluster="" i
	for i in 0 1 2; do cluster+="${cluster:+,}e$i=http://127.0.0.1:${ETCD_PEER[i]}"; done
	ETCDPIDS=()
	for i in 0 1 2; do
		rm -rf "$DIR/etcd/e$i"
		$(pin ETCD_CPUS) "$etcd" --name "e$i" --data-dir "$DIR/etcd/e$i" \
			--listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[i]}" \
			--listen-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[i]}" \
			--initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bench-ha \
			--log-level warn >"$DIR/e$i.log" 2>&1 &
		ETCDPIDS+=($!)
		PIDS+=($!)
	done
	for i in 0 1 2; do
		until curl -fsS -o /dev/null "http://127.0.0.1:${ETCD_CLIENT[i]}/readyz" 2>/dev/null; do sleep 0.1; done
	done
}
etcd_down() { kill "${ETCDPIDS[@]}"; wait "${ETCDPIDS[@]}" 2>/dev/null || true; }

# replica I [ARGS...]: start replica rI on the cluster; its pid in RPID[I].
declare -A RPID=()
replica() {
	local i="$1"
	shift
	mkdir -p "$DIR/r$i"
	$(pin MINT_CPUS) "${REPLICA_BIN:-$meshid}" server --store etcd --etcd-endpoints "$endpoints" --etcd-prefix /bench/ \
		--replica-id "r$i" --kek-file "$DIR/kek" --data-dir "$DIR/r$i/data" \
		--admin-socket "$DIR/r$i/a.sock" --socket= --log-level warn "$@" >>"$DIR/r$i.log" 2>&1 &
	RPID[$i]=$!
	PIDS+=($!)
}
wait_admin() { until "$meshid" bundle show --admin-socket "$1" >/dev/null 2>&1; do sleep 0.05; done; }
stop_replicas() {
	local p
	for p in "${RPID[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${RPID[@]}"; do wait "$p" 2>/dev/null || true; done
	RPID=()
}
fresh() { # etcd cluster + KEK, no replica yet
	rm -rf "$DIR/r0" "$DIR/r1" "$DIR/r2" "$DIR/kek" "$DIR"/r?.log
	etcd_up
	"$meshid" kek create "$DIR/kek" >/dev/null
}

mint_etcd() { # $1 clients, $2 replicas (1 or 3)
	fresh
	local socks="" i
	for ((i = 0; i < $2; i++)); do
		replica "$i"
		wait_admin "$DIR/r$i/a.sock"
		socks+="${socks:+,}$DIR/r$i/a.sock"
	done
	stamp "meshid${REPLICA_BIN:+ $REPLICA_BIN} etcd, $2 replica(s), -c $1 -n $N"
	timed $(pin MINT_CPUS) "$meshid" bench mint --admin-socket "$socks" -c "$1" -n "$N"
	stop_replicas
	etcd_down
}

mint_bolt() { # $1 clients
	rm -rf "$DIR/bolt"
	mkdir -p "$DIR/bolt"
	$(pin MINT_CPUS) "$meshid" server --data-dir "$DIR/bolt/data" --admin-socket "$DIR/bolt/a.sock" --socket= --log-level warn >"$DIR/bolt.log" 2>&1 &
	local pid=$!
	PIDS+=($pid)
	wait_admin "$DIR/bolt/a.sock"
	stamp "meshid bolt, -c $1 -n $N"
	timed $(pin MINT_CPUS) "$meshid" bench mint --admin-socket "$DIR/bolt/a.sock" -c "$1" -n "$N"
	kill "$pid"
	wait "$pid" 2>/dev/null || true
}

# SPIRE's server on sqlite3 (see BENCHMARKS.md for how it was built), and a
# load client calling svid.v1 MintX509SVID as bench mint calls meshid.
mint_spire() { # $1 clients
	local D="$DIR/spire"
	rm -rf "$D"
	mkdir -p "$D/data" "$D/s"
	"$root/testbed/spire/server-conf.sh" "$D" >"$D/server.conf"
	$(pin MINT_CPUS) "$SPIRE" run -config "$D/server.conf" >"$DIR/spire.log" 2>&1 &
	local pid=$!
	PIDS+=($pid)
	until "$SPIRE" healthcheck -socketPath "$D/s/api.sock" >/dev/null 2>&1; do sleep 0.1; done
	stamp "SPIRE sqlite3, -c $1 -n $N"
	timed $(pin MINT_CPUS) "$SPIRE_LOAD" -socket "$D/s/api.sock" -c "$1" -n "$N"
	kill "$pid"
	wait "$pid" 2>/dev/null || true
}

do_mint() {
	stamp "mint; commit $(git -C "$root" rev-parse --short HEAD); etcd on CPUs ${ETCD_CPUS:-any}, mint path on ${MINT_CPUS:-any}"
	local r c
	local kinds="${MINT_KINDS:-etcd spire bolt etcd3}" k
	for c in ${CLIENTS:-8 32}; do
		for ((r = 1; r <= RUNS; r++)); do
			for k in $kinds; do
				echo "--- run $r -c $c $k"
				case "$k" in
				etcd) mint_etcd "$c" 1 ;;
				old) REPLICA_BIN="$MESHID_OLD" mint_etcd "$c" 1 ;;
				etcd3) mint_etcd "$c" 3 ;;
				bolt) mint_bolt "$c" ;;
				spire) if [[ -n "${SPIRE:-}" ]]; then mint_spire "$c"; fi ;;
				*) echo "bench-ha: unknown MINT_KINDS entry $k" >&2; exit 2 ;;
				esac
			done
		done
	done
}

leader_of() { # replica index of the leader, as r0's.. status says
	local i out
	for i in 0 1 2; do
		[[ -n "${RPID[$i]:-}" ]] || continue
		out="$("$meshid" status -o json --admin-socket "$DIR/r$i/a.sock" 2>/dev/null)" || continue
		out="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["store"].get("leader",""))' <<<"$out")"
		[[ "$out" == r? ]] && { echo "${out#r}"; return; }
	done
	return 1
}

# One TTL: 3 replicas; FAILOVERS times: find the leader, kill -9 it, poll
# the other two with the next lifecycle step until one succeeds, restart
# the killed one.
do_failover() {
	local ttl="$1" k step=prepare
	fresh
	for i in 0 1 2; do replica "$i" --etcd-lease-ttl "${ttl}s"; done
	for i in 0 1 2; do wait_admin "$DIR/r$i/a.sock"; done
	for ((k = 1; k <= ${FAILOVERS:-3}; k++)); do
		local l
		until l="$(leader_of)"; do sleep 0.1; done
		# Let the others settle as followers before the kill.
		sleep 1
		stamp "failover ttl ${ttl}s run $k: kill -9 r$l (pid ${RPID[$l]}), then ca $step"
		local t0 t1 ok="" pollers=()
		rm -f "$DIR"/won.*
		t0=$(date +%s.%N)
		kill -KILL "${RPID[$l]}"
		wait "${RPID[$l]}" 2>/dev/null || true
		unset "RPID[$l]"
		# Every survivor is asked at once, each in its own loop: a
		# follower holds a lifecycle request up to 2 s (leaderWait) before
		# refusing it, so asking them in turn timed that wait, not the
		# failover. The replica that wins answers its pending request as
		# soon as it has taken over.
		for i in 0 1 2; do
			[[ -n "${RPID[$i]:-}" ]] || continue
			(
				until compgen -G "$DIR/won.*" >/dev/null; do
					if "$meshid" ca $step --admin-socket "$DIR/r$i/a.sock" >"$DIR/step.r$i.out" 2>&1; then
						date +%s.%N >"$DIR/won.r$i"
						break
					fi
				done
			) &
			pollers+=($!)
		done
		wait "${pollers[@]}"
		for f in "$DIR"/won.*; do
			if [[ -z "$ok" ]] || [[ "$(cat "$f")" < "$t1" ]]; then ok="${f##*/won.}" t1="$(cat "$f")"; fi
		done
		echo "failover ttl=${ttl}s run=$k killed=r$l step="ca $step" on=$ok seconds=$(echo "$t1 - $t0" | bc)"
		# activate --force: the publication window is not what is timed.
		[[ "$step" == prepare ]] && step="activate --force" || step=prepare
		replica "$l" --etcd-lease-ttl "${ttl}s"
		wait_admin "$DIR/r$l/a.sock"
	done
	stop_replicas
	etcd_down
}

case "${1:-}" in
mint) do_mint ;;
failover) for t in ${TTLS:-10 3}; do do_failover "$t"; done ;;
*) echo "usage: $0 mint|failover" >&2; exit 2 ;;
esac
