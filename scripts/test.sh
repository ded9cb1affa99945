#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (see
# setup.sh), then runs every test in release mode (the plugin runtime and
# the integration tests are far faster optimised). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --broker
export WAGG_TANSU="${WAGG_TANSU:-${WAGG_CACHE:-$HOME/.cache/wagg}/tansu/bin/tansu}"
cargo test --release "$@"
