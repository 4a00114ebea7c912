#!/usr/bin/env bash
# One command for the throughput/latency comparison, HTTP and HTTPS: installs the peers from
# Debian, builds the release binaries, and writes docs/benchmarks.md (about 25 minutes on 2 cores;
# `--only tls` runs the HTTPS part alone, about 10). `benches/run.sh --smoke` is the CI check.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install-peers.sh
cargo build --release --locked -p luma-proxy -p luma-demo-backend -p luma-benches
exec python3 benches/compare.py "$@"
