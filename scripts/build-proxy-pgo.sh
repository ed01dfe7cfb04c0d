#!/usr/bin/env bash
# Builds weft-proxy for production with profile-guided optimisation, into target/pgo/weft-proxy:
#   1. an instrumented build (cargo profile `pgo`: fat LTO, one codegen unit),
#   2. a training run: weft-load --train proxies HTTP/1.1 and h2c through it, with 100-byte and
#      10 KB bodies, against an nginx backend, fed by weftd,
#   3. the final build, optimised with the merged profile (llvm-profdata of rustc's LLVM).
# The same code as `cargo build --release`; only the compiler's layout and inlining decisions
# change. BENCHMARKS.md has what it is worth.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
ensure wrk=wrk h2load=nghttp2-client nginx=nginx-light taskset=util-linux
if ! ensure "llvm-profdata-$llvm=llvm-$llvm"; then
  # The profile must be merged by rustc's own LLVM version; without it the build goes on
  # without a profile, and says so.
  echo "==> WARNING: llvm-profdata-$llvm (apt package llvm-$llvm) is not available:" \
    "building weft-proxy WITHOUT a profile (cargo profile pgo only)" >&2
  cargo build --profile pgo --locked -p weft-proxy
  echo "==> target/pgo/weft-proxy (no profile)"
  exit 0
fi
cargo build --release --locked -p weft-control-plane -p weft-benches

gen="$PWD/target/pgo-gen"
echo "==> instrumented weft-proxy"
CARGO_TARGET_DIR="$gen" RUSTFLAGS="-Cprofile-generate=$gen/profiles" \
  cargo build --profile pgo --locked -p weft-proxy
# Build scripts ran instrumented too: only the proxy's own profile is kept.
rm -rf "$gen/profiles"
echo "==> training run"
for body in 100 10240; do
  ./target/release/weft-load --train --weft-proxy "$gen/pgo/weft-proxy" \
    --body-bytes "$body" --duration 5 --h2-requests 50000
done
"llvm-profdata-$llvm" merge -o "$PWD/target/weft-proxy.profdata" "$gen/profiles"

echo "==> optimised weft-proxy"
CARGO_TARGET_DIR="$PWD/target/pgo-use" RUSTFLAGS="-Cprofile-use=$PWD/target/weft-proxy.profdata" \
  cargo build --profile pgo --locked -p weft-proxy
mkdir -p target/pgo
cp target/pgo-use/pgo/weft-proxy target/pgo/weft-proxy
echo "==> target/pgo/weft-proxy"
