#!/usr/bin/env bash
# Finds or builds etcd for `make run-ha` and prints the binary's path on its
# last line. Nothing is downloaded but Go modules from the module proxy. In
# this order:
#   1. $ETCD_BIN, if set (any etcd >= 3.5);
#   2. the Kubernetes test bed's etcd v3.7.0 (testbed/k8s/build.sh), if
#      that bed is already built;
#   3. an etcd built earlier by this script (cached by go.sum and this file);
#   4. Debian's etcd-server (/usr/bin/etcd), if installed and >= 3.5
#      (bookworm's 3.4 is too old for the v3.7 client's API);
#   5. a build of go.etcd.io/etcd/server/v3 v3.7.0 with the wrapper module in
#      testbed/k8s, which pins it (cold: ~1-3 min on 2 cores; only etcd's
#      dependencies are compiled, not the API server's).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION=3.7.0

# version BIN: etcd's server version, e.g. 3.7.0, or nothing.
version() { "$1" --version 2>/dev/null | sed -n 's/^etcd Version: //p' | head -n 1; }
# recent BIN: etcd >= 3.5.
recent() {
	local v major minor
	v="$(version "$1")" || return 1
	IFS=. read -r major minor _ <<<"$v"
	[[ -n "$major" && -n "$minor" ]] && ((major > 3 || (major == 3 && minor >= 5)))
}

if [[ -n "${ETCD_BIN:-}" ]]; then
	recent "$ETCD_BIN" || { echo "etcd/build.sh: ETCD_BIN=$ETCD_BIN is not etcd >= 3.5 (it says: $(version "$ETCD_BIN" || true))" >&2; exit 1; }
	echo "$ETCD_BIN"
	exit 0
fi

# The bed's bin dir, by the same stamp testbed/k8s/build.sh computes,
# without running it (that would build the API server).
k8s_stamp="$(cd "$root/testbed/k8s" && sha256sum go.sum build.sh | sha256sum | cut -c1-16)"
bed_bin="${K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid/k8s-v1.37.2-$k8s_stamp/bin}"
if [[ -f "$bed_bin/.complete" && -x "$bed_bin/etcd" && "$(version "$bed_bin/etcd")" == "$VERSION" ]]; then
	echo "$bed_bin/etcd"
	exit 0
fi

stamp="$(cat "$root/testbed/k8s/go.sum" "$0" | sha256sum | cut -c1-16)"
bin="${XDG_CACHE_HOME:-$HOME/.cache}/meshid/etcd-v$VERSION-$stamp/etcd"
if [[ -x "$bin" && "$(version "$bin")" == "$VERSION" ]]; then
	echo "$bin"
	exit 0
fi

if [[ -x /usr/bin/etcd ]] && recent /usr/bin/etcd; then
	echo "etcd/build.sh: using Debian's etcd $(version /usr/bin/etcd)" >&2
	echo /usr/bin/etcd
	exit 0
fi

mkdir -p "$(dirname "$bin")"
echo "etcd/build.sh: building etcd v$VERSION into $(dirname "$bin") (cold: ~1-3 min)" >&2
(cd "$root/testbed/k8s" && CGO_ENABLED=0 GOFLAGS=-mod=mod "${GO:-go}" build -trimpath -ldflags "-s -w" -o "$bin.tmp" go.etcd.io/etcd/server/v3)
mv "$bin.tmp" "$bin"
echo "$bin"
