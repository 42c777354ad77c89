#!/usr/bin/env bash
# System packages `make test` and `make demo` need, installed with apt when missing, so the two
# commands set up a fresh machine themselves. `test` adds what only the tests use: Chromium
# (the report test renders the page headless), a check for Rust's cargo (the native decoder in
# contracts/native) and a check for Go (the Collector and the Go example are built from the Go
# module proxy; Go comes from the machine: Debian's golang-go is too old to fetch the release
# go.mod names, so it is not installed here).
#   deploy/system-deps.sh demo|test
set -euo pipefail
purpose=${1:-test}

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have java || missing+=(openjdk-17-jre-headless)
have mvn || missing+=(maven)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [[ $purpose == test ]]; then
  have chromium || have chromium-browser || missing+=(chromium)
fi

if ((${#missing[@]})); then
  echo "system-deps: installing ${missing[*]}"
  if [[ $(id -u) == 0 ]]; then
    sudo=()
  elif have sudo; then
    sudo=(sudo)
  else
    echo "system-deps: ${missing[*]} missing; install them (Debian/Ubuntu: apt-get install ${missing[*]}) or run as root" >&2
    exit 1
  fi
  if ! have apt-get; then
    echo "system-deps: ${missing[*]} missing and apt-get is not available; install them with your package manager" >&2
    exit 1
  fi
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}"
fi

if [[ $purpose == test ]] && ! have cargo; then
  echo "system-deps: cargo not found: Rust is needed to build the native decoder (contracts/native)" \
    "that make test requires (rustup.rs, or Debian's cargo)" >&2
  exit 1
fi

if [[ $purpose == test ]]; then
  go=$(command -v go || echo /usr/local/go/bin/go)
  version=$("$go" env GOVERSION 2>/dev/null || true)  # empty when there is no Go at all
  minor=$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$version")
  if [[ ! $minor =~ ^[0-9]+$ ]] || ((minor < 21)); then
    echo "system-deps: Go ${version:-not found} cannot build deploy/collector and examples/signal-subscriber:" \
      "Go 1.21 or newer is needed on PATH (it fetches the Go release go.mod names from the Go module proxy)" >&2
    exit 1
  fi
fi
