#!/usr/bin/env bash
# The control-plane push benchmark in one command: builds weftd and weft-pushload in release and
# runs it at 1,000 and at 5,000 services (10 endpoints each, 100 ADS clients). Extra arguments go
# to every run: --rounds N --clients N --endpoints N --poll-ms MS.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
ensure taskset=util-linux
cargo build --release --locked -p weft-control-plane -p weft-benches
for n in 1000 5000; do
  taskset -c 1 ./target/release/weft-pushload --services "$n" "$@"
  echo
done
