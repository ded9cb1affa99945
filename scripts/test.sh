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
# Skipped when arguments select particular tests:
if [ $# -eq 0 ]; then
  # The guest SDK's own tests, in a separate build (see default-members in
  # Cargo.toml).
  cargo test --release -p wagg-guest-sdk
  # The README's install, quickstart and demo as a newcomer follows them
  # (tests/newcomer.rs). Its binary is run directly: `cargo install` needs
  # the build lock that `cargo test` holds while tests run.
  newcomer=$(cargo test --release --test newcomer --no-run --message-format=json |
    grep '"name":"newcomer"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
  "$newcomer" --ignored --nocapture
fi
