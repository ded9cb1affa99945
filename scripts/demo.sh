#!/usr/bin/env bash
# Sets up what is missing (see setup.sh) and runs `wagg demo`: an in-process
# Kafka cluster, a purchase-event generator, the example plugins, and the
# HTTP API on 127.0.0.1:8080. Extra arguments go to `wagg demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo run --release -p wagg -- demo "$@"
