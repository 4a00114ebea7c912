#!/usr/bin/env bash
# One command for the scale run: installs the peers, builds the images and release binaries,
# then runs benches/scale.py (200 projects behind one proxy; writes docs/scale.md).
# `benches/scale.sh --smoke` is the short check CI runs (4 projects, writes nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install-peers.sh
docker/build-images.sh dev
cargo build --release --locked -p luma-cli -p luma-demo-backend -p luma-benches
exec python3 benches/scale.py "$@"
