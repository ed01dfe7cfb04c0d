#!/usr/bin/env bash
# The DNS benchmark in one command: installs dnsperf, Knot DNS and dig, builds weftd in release,
# and runs weft-dnsload (weftd vs Knot, 10,000 services, one thread each, pinned, in rounds).
# Extra arguments go to weft-dnsload: --rounds N --duration SECS.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v dnsperf >/dev/null || missing+=(dnsperf)
command -v knotd >/dev/null || missing+=(knot)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --locked -p weft-control-plane -p weft-benches
exec ./target/release/weft-dnsload "$@"
