#!/usr/bin/env bash
# Installs what building and testing wagg needs, skipping what is present:
#   - libclang (RocksDB's bindings) and a C/C++ toolchain, from apt;
#   - the wasm32-wasip2 Rust target (plugins);
#   - with --broker: tansu 0.6.0, the Kafka-API broker the integration tests
#     start (cached under $WAGG_CACHE, default ~/.cache/wagg);
#   - with --tests: the broker, schemathesis 4.32.5 (the OpenAPI test, in a
#     virtualenv under $WAGG_CACHE), Chromium, Node and playwright-core (the
#     dashboard test, playwright-core under $WAGG_CACHE) and curl (the docs
#     test).
set -euo pipefail

want_broker=false
want_fuzzer=false
want_plugins=false
for arg in "$@"; do
  case "$arg" in
    --broker) want_broker=true ;;
    --plugins) want_plugins=true ;;
    --tests) want_broker=true; want_fuzzer=true; want_plugins=true ;;
    *) echo "usage: $0 [--broker | --plugins | --tests]" >&2; exit 2 ;;
  esac
done

cache="${WAGG_CACHE:-$HOME/.cache/wagg}"
mkdir -p "$cache"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
if $want_fuzzer; then
  # The dashboard test drives headless Chromium.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # The docs test runs the documentation's curl examples.
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # The terminal-output test runs wagg under a pseudo-terminal.
  command -v script >/dev/null 2>&1 || missing+=(bsdutils)
  # The dashboard test drives the page with playwright-core (Node).
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
fi
if $want_plugins; then
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
fi
if $want_fuzzer && [ ! -x "$cache/schemathesis/bin/schemathesis" ]; then
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi

if $want_broker; then
  tansu="$cache/tansu/bin/tansu"
  if [ ! -x "$tansu" ]; then
    echo "setup: installing tansu 0.6.0 into $cache/tansu (about 11 minutes cold)" >&2
    cargo install tansu --version 0.6.0 --features dynostore,libsql --locked --root "$cache/tansu"
  fi
fi

if $want_fuzzer; then
  schemathesis="$cache/schemathesis/bin/schemathesis"
  if [ ! -x "$schemathesis" ]; then
    echo "setup: installing schemathesis 4.32.5 into $cache/schemathesis" >&2
    python3 -m venv "$cache/schemathesis"
    "$cache/schemathesis/bin/pip" install --quiet schemathesis==4.32.5
  fi
  if [ ! -f "$cache/playwright/node_modules/playwright-core/package.json" ]; then
    echo "setup: installing playwright-core 1.65.1 into $cache/playwright (no browser download)" >&2
    mkdir -p "$cache/playwright"
    (cd "$cache/playwright" && npm install --no-audit --no-fund --silent playwright-core@1.65.1)
  fi
fi

if $want_plugins; then
  # The same layout `wagg plugin build` installs into (componentize.rs):
  # <cache>/plugin-tools/<package name>-<version>, complete once .installed
  # exists.
  tools="$cache/plugin-tools"
  pins="$(dirname "$0")/../host/templates/plugin-tools.txt"
  while read -r language registry package version; do
    case "$language" in ''|'#'*) continue ;; esac
    dir="$tools/${package##*/}-$version"
    [ -f "$dir/.installed" ] && continue
    echo "setup: installing $package $version into $dir" >&2
    rm -rf "$dir" && mkdir -p "$dir"
    case "$registry" in
      pypi)
        python3 -m venv "$dir"
        "$dir/bin/pip" install --quiet --disable-pip-version-check "$package==$version" </dev/null ;;
      npm)
        echo '{"private": true}' > "$dir/package.json"
        npm install --no-audit --no-fund --silent --prefix "$dir" "$package@$version" </dev/null ;;
      *) echo "setup: unknown registry $registry in $pins" >&2; exit 1 ;;
    esac
    touch "$dir/.installed"
  done < "$pins"
fi
