#!/usr/bin/env bash
# Deploy wall time with an app that ignores SIGTERM as PID 1 (like busybox httpd and many real
# servers): 2 replicas of the demo backend with DEMO_DEFAULT_SIGNALS=1, a prebuilt image, N
# deploys (default 21) in a row, each timed from `luma deploy` start to exit. Writes
# docs/deploy-time.md. Usage: benches/deploy-time.sh [N]. LUMA_BIN times another `luma` build
# (e.g. an older commit's) and OUT writes elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-21}
docker/build-images.sh dev >/dev/null
if [ -z "${LUMA_BIN:-}" ]; then
  cargo build --release --locked -p luma-cli >/dev/null 2>&1
fi
luma=${LUMA_BIN:-$PWD/target/release/luma}
out=${OUT:-docs/deploy-time.md}
tag="lumabench-dt-$$"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export LUMA_PROXY_NAME="$tag-proxy" LUMA_HTTP_PORT="127.0.0.1:$port" LUMA_HTTPS_PORT="127.0.0.1:0"
# The host's firewall outlives this bench: luma's fast-path rule (luma-cli/src/hostpath.rs) stays off.
export LUMA_HOST_FAST_PATH=off
cleanup() {
  docker rm -f -v "$LUMA_PROXY_NAME" >/dev/null 2>&1 || true
  docker ps -aq --filter "label=luma.project=$tag" | xargs -r docker rm -f -v >/dev/null
  docker network rm "$tag-network" >/dev/null 2>&1 || true
  docker volume rm "$LUMA_PROXY_NAME-state" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
cat >"$dir/luma.yml" <<YAML
name: $tag
apps:
  web:
    image: luma-demo:dev
    replicas: 2
    environment:
      plain: [DEMO_DEFAULT_SIGNALS=1]
    health_check:
      path: /up
      interval: 200ms
    proxy:
      hosts: [$tag.test]
      app_port: 3000
YAML
times=()
"$luma" -c "$dir/luma.yml" deploy --force >/dev/null 2>&1   # first release (nothing to retire)
for i in $(seq "$n"); do
  start=$(date +%s%N)
  "$luma" -c "$dir/luma.yml" deploy --force >/dev/null 2>&1
  end=$(date +%s%N)
  times+=("$(( (end - start) / 1000000 ))")
done
python3 - "$n" "${times[@]}" <<'PY' | tee "$out"
import statistics, sys
n, ts = int(sys.argv[1]), sorted(int(t) / 1000 for t in sys.argv[2:])
print("# Deploy wall time, app ignoring SIGTERM as PID 1\n")
print(f"`benches/deploy-time.sh`: {n} deploys in a row of 2 replicas of the demo backend with")
print("`DEMO_DEFAULT_SIGNALS=1` (no SIGTERM handler, so as PID 1 it ignores SIGTERM), prebuilt image,")
print("each timed from `luma deploy` start to exit (start, check, switch, drain, retire, prune).\n")
print("| deploys | median | min | max |\n|---:|---:|---:|---:|")
print(f"| {n} | {statistics.median(ts):.2f} s | {ts[0]:.2f} s | {ts[-1]:.2f} s |")
print("\nBefore (main at f63841a: no init, old replicas stopped one by one, each waiting out the 10 s")
print("grace): median 22.3 s over 21 deploys (the issue's figure); re-measured here with")
print("`LUMA_BIN=<f63841a's luma> benches/deploy-time.sh 7`: median 21.67 s (min 20.97, max 22.56).")
PY
