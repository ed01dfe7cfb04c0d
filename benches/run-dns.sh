#!/usr/bin/env bash
# The DNS benchmark in one command: installs dnsperf, Knot DNS and dig, builds weftd in release,
# and runs weft-dnsload (weftd vs Knot, 10,000 services, one thread each, pinned, in rounds).
# Extra arguments go to weft-dnsload: --rounds N --duration SECS.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure dnsperf=dnsperf knotd=knot dig=bind9-dnsutils taskset=util-linux
cargo build --release --locked -p weft-control-plane -p weft-benches
exec ./target/release/weft-dnsload "$@"
