#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests that start
# the real proxy against a loopback test provider serving ../shared/fixtures.
# Ends with one summary line over every test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test-tools
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: [a-z]+\. [0-9]+ passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo "all tests: ${passed} passed, ${failed} failed"
exit "$status"
