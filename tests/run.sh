#!/usr/bin/env bash
# Runs every test: unit, in-process loopback, and the Docker integration tests against the real
# engine. Builds the images first (FROM scratch, no registry). Docker missing is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "tests/run.sh: the Docker engine is not reachable; the integration tests need it." >&2
  exit 1
fi
docker/build-images.sh dev
cargo test --workspace --locked "$@"
