#!/usr/bin/env bash
# One command for deploys under load: installs the peers, builds the images and release
# binaries, then runs benches/deploys_under_load.py (writes docs/deploys-under-load.md).
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install-peers.sh
docker/build-images.sh dev
cargo build --release --locked -p luma-cli -p luma-demo-backend -p luma-benches
exec python3 benches/deploys_under_load.py "$@"
