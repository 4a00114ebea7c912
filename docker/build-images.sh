#!/usr/bin/env bash
# Builds the luma-proxy and luma-demo images FROM scratch, from statically linked binaries.
# Nothing is pulled: no registry is needed. Usage: docker/build-images.sh [TAG] (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-${LUMA_IMAGE_TAG:-dev}}
target=x86_64-unknown-linux-gnu

echo "==> building static binaries (release, $target)"
# With --target, RUSTFLAGS reach only the target binaries, not build scripts or proc macros.
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --locked --target "$target" -p luma-proxy -p luma-demo-backend

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/luma-proxy" "target/$target/release/luma-demo-backend" "$ctx/"
mkdir -p "$ctx/state"
cp docker/luma-proxy.Dockerfile docker/luma-demo.Dockerfile "$ctx/"

echo "==> docker build luma-proxy:$tag"
docker build -q -f "$ctx/luma-proxy.Dockerfile" -t "luma-proxy:$tag" "$ctx"
echo "==> docker build luma-demo:$tag"
docker build -q -f "$ctx/luma-demo.Dockerfile" -t "luma-demo:$tag" "$ctx"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^luma-(proxy|demo):$tag "
