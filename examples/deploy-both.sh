#!/usr/bin/env bash
# The main job: build everything, deploy examples/basic (project gmail) and examples/nextjs
# (project nextjs) to the local engine with `luma deploy`, and show each host answering with its
# own app, though both projects have an app called `web`.
#
# The proxy publishes LUMA_HTTP_PORT (default here 127.0.0.1:8080; use 80 on a server).
set -euo pipefail
cd "$(dirname "$0")/.."
export LUMA_HTTP_PORT=${LUMA_HTTP_PORT:-127.0.0.1:8080}
export LUMA_HTTPS_PORT=${LUMA_HTTPS_PORT:-127.0.0.1:8443}
docker/build-images.sh dev
cargo build --release --locked -p luma-cli
luma=target/release/luma
$luma -c examples/basic/luma.yml deploy --force
$luma -c examples/nextjs/luma.yml deploy --force
port=${LUMA_HTTP_PORT##*:}
for host in gmail.localhost nextjs.localhost; do
  printf '%-18s -> ' "$host"
  curl -fsS -H "Host: $host" "http://127.0.0.1:$port/"
done
$luma -c examples/nextjs/luma.yml status
