#!/usr/bin/env bash
# Builds m3u-edge (release) and runs it in the foreground with the example
# config, or with the config given as the first argument.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
exec cargo run --release --bin m3u-edge -- -c "${1:-conf/m3u-edge.yaml}"
