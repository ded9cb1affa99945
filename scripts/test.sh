#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (see
# setup.sh), then runs every test in release mode (the plugin runtime and
# the integration tests are far faster optimised). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --tests
export WAGG_TANSU="${WAGG_TANSU:-${WAGG_CACHE:-$HOME/.cache/wagg}/tansu/bin/tansu}"
export WAGG_SCHEMATHESIS="${WAGG_SCHEMATHESIS:-${WAGG_CACHE:-$HOME/.cache/wagg}/schemathesis/bin/schemathesis}"
export WAGG_PLAYWRIGHT="${WAGG_PLAYWRIGHT:-${WAGG_CACHE:-$HOME/.cache/wagg}/playwright/node_modules}"
cargo test --release "$@"
