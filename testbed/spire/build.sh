#!/usr/bin/env bash
# Builds what the SPIRE comparisons in BENCHMARKS.md run, from the Go module
# proxy, into ${OUT:-$HOME/.cache/meshid/spire-v1.13.3}: SPIRE's server
# (in a scratch module: SPIRE is not a dependency of meshid), and this
# module's two clients, mintload (svid.v1 MintX509SVID, as `meshid bench
# mint`) and agents (N simulated SPIRE agents, as `meshid bench agents`).
# Prints the directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$HOME/.cache/meshid/spire-v1.13.3}
mkdir -p "$out"
if [[ ! -x "$out/spire-server" ]]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && go mod init spirebuild >/dev/null 2>&1 &&
		go get -tool github.com/spiffe/spire/cmd/spire-server@v1.13.3 >&2 &&
		go build -o "$out/spire-server" github.com/spiffe/spire/cmd/spire-server)
fi
(cd "$here" && go build -o "$out/spire-mintload" ./mintload && go build -o "$out/spire-agents" ./agents)
echo "$out"
