#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests that start
# the real proxy against a loopback test provider serving ../shared/fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --locked "$@"
