#!/usr/bin/env bash
# The load benchmark in one command: installs wrk, h2load, nginx and Envoy 1.40, builds release
# binaries (weft-proxy profile-guided, by scripts/build-proxy-pgo.sh), and runs weft-load
# (direct vs weft-proxy vs Envoy vs nginx reverse proxy, pinned, in rounds). Extra arguments go
# to weft-load: --rounds N --duration SECS --h2-requests N --body-bytes N.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure wrk=wrk h2load=nghttp2-client nginx=nginx-light taskset=util-linux
ensure_envoy 1.40.0
cargo build --release --locked -p weft-proxy -p weft-control-plane -p weft-benches
# weft-proxy as it ships: the profile-guided build (WEFT_PGO=0: the plain release build).
proxy=./target/release/weft-proxy
if [ "${WEFT_PGO:-1}" != 0 ]; then
  ./scripts/build-proxy-pgo.sh
  proxy=./target/pgo/weft-proxy
fi
awk '/^cpu /{print "cpu steal jiffies before run: " $9}' /proc/stat
exec ./target/release/weft-load --envoy "$PWD/.venv/bin/envoy" --weft-proxy "$proxy" "$@"
