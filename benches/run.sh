#!/usr/bin/env bash
# One command for the throughput/latency comparison: installs the peers from Debian, builds the
# release binaries, and writes docs/benchmarks.md. `benches/run.sh --smoke` is the CI check.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install-peers.sh
cargo build --release --locked -p luma-proxy -p luma-demo-backend -p luma-benches
exec python3 benches/compare.py "$@"
