#!/usr/bin/env bash
# Runs "$@" with one Kubernetes test bed (etcd + kube-apiserver, see
# internal/k8stest) up for its whole duration, and stops the bed afterwards
# whatever the command's outcome. The command sees MESHID_K8S_DIR (the bed)
# and MESHID_K8S_REQUIRED=1, so the Kubernetes tests fail instead of skipping
# when something is wrong with the bed. Exits with the command's status.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
GO="${GO:-go}"
bin="$("$root/testbed/k8s/build.sh" | tail -n 1)"
dir="$(mktemp -d "${TMPDIR:-/tmp}/meshid-k8sbed.XXXXXX")"
# Built once, so `down` needs no compile and works even if the tree changed.
(cd "$root" && "$GO" build -o "$dir/k8sbed" ./internal/k8stest/k8sbed)
down() {
	"$dir/k8sbed" down --dir "$dir/bed" || echo "with-k8s: stopping the bed in $dir failed" >&2
	# Keep the logs of a failed run; a clean run leaves nothing behind.
	if [[ "${1:-0}" == 0 && -z "${MESHID_K8S_KEEP:-}" ]]; then rm -rf "$dir"; else echo "with-k8s: bed logs kept in $dir/bed" >&2; fi
}
trap 'rc=$?; trap - EXIT; down "$rc"; exit "$rc"' EXIT
trap 'exit 130' INT TERM
start=$SECONDS
# Not eval "$(...)" directly: that would hide a failed up.
env_line="$("$dir/k8sbed" up --bin "$bin" --dir "$dir/bed")"
eval "$env_line"
echo "with-k8s: bed up in $((SECONDS - start)) s ($MESHID_K8S_DIR)" >&2
export MESHID_K8S_DIR MESHID_K8S_REQUIRED=1
export MESHID_ETCD_BIN="$bin/etcd"
"$@"
