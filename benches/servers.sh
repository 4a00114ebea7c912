#!/usr/bin/env bash
# Deploy time over SSH: `luma deploy` of one app to one server, and of the same app to two
# servers (all or nothing), on the test topology of tests/servers/up.sh (two more Docker
# engines on this machine, each behind a real sshd).
#
# Each run changes one file of the build context, so every deploy builds a new image here,
# streams it to each server, starts and health-checks the new release there, switches and
# settles: the whole path a real redeploy takes. The first deploy of each project (which also
# sends the proxy image and starts the proxy) is reported apart.
#
# Usage: benches/servers.sh   (RUNS, default 5; LUMA_BIN for another luma build;
#        LUMA_TEST_TOPOLOGY=DIR with its env loaded to reuse a running topology)
# Prints a markdown table of medians and removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
tag="lumabench-srv-$$"
work=$(mktemp -d)
topology=''

if [[ -z ${LUMA_TEST_TOPOLOGY:-} ]]; then
  topology=$(mktemp -d)
  LUMA_TEST_OWNER_PID=$$ tests/servers/up.sh "$topology" >/dev/null 2>"$work/up.err" ||
    { cat "$work/up.err" >&2; exit 1; }
  # shellcheck disable=SC1091
  . "$topology/env"
fi

export LUMA_SSH_CONFIG=$LUMA_TEST_SSH_CONFIG
export LUMA_HTTP_PORT=127.0.0.1:0
export LUMA_HTTPS_PORT=127.0.0.1:0
# The host's firewall outlives this bench: luma's fast-path rule (luma-cli/src/hostpath.rs) stays off.
export LUMA_HOST_FAST_PATH=off

cleanup() {
  local status=$?
  set +e
  for p in one two; do
    [[ -f $work/$p/luma.yml ]] &&
      LUMA_PROXY_NAME="$tag-$p-proxy" "$luma" -c "$work/$p/luma.yml" remove --yes >/dev/null 2>&1
    docker images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$tag-${p}_*" |
      xargs -r docker rmi -f >/dev/null 2>&1
  done
  for h in "$LUMA_TEST_DOCKER_HOST_luma_s1" "$LUMA_TEST_DOCKER_HOST_luma_s2"; do
    for p in one two; do
      docker -H "$h" rm -f -v "$tag-$p-proxy" >/dev/null 2>&1
      docker -H "$h" volume rm "$tag-$p-proxy-state" >/dev/null 2>&1
    done
    docker -H "$h" images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$tag-*" |
      xargs -r docker -H "$h" rmi -f >/dev/null 2>&1
  done
  rm -rf "$work"
  [[ -z $topology ]] || tests/servers/down.sh "$topology" >/dev/null 2>&1
  exit "$status"
}
trap cleanup EXIT

echo "==> luma (release build)" >&2
if [[ -z ${LUMA_BIN:-} ]]; then
  cargo build --release --locked -p luma-cli >/dev/null 2>&1 ||
    { echo "servers.sh: cargo build --release -p luma-cli failed" >&2; exit 1; }
fi
luma=${LUMA_BIN:-$PWD/target/release/luma}
docker image inspect luma-demo:dev >/dev/null 2>&1 ||
  { echo "servers.sh: luma-demo:dev is missing; run docker/build-images.sh dev" >&2; exit 1; }

for p in one two; do
  servers='[luma-s1]'
  [[ $p == two ]] && servers='[luma-s1, luma-s2]'
  mkdir -p "$work/$p"
  printf 'FROM luma-demo:dev\nENV PORT=3000\nCOPY stamp /stamp\n' >"$work/$p/Dockerfile"
  echo 0 >"$work/$p/stamp"
  cat >"$work/$p/luma.yml" <<YAML
name: $tag-$p
apps:
  web:
    build: {context: .}
    servers: $servers
    health_check: {path: /up, interval: 200ms}
    proxy: {hosts: [$p.$tag.test], app_port: 3000, ssl: false}
YAML
done

# Seconds taken by one `luma deploy`; fails loudly with luma's output. Each project has a proxy
# of its own, so both first deploys set one up.
deploy() {
  local p=$1 t0 t1 out
  t0=$(date +%s.%N)
  out=$(LUMA_PROXY_NAME="$tag-$p-proxy" "$luma" -c "$work/$p/luma.yml" deploy --force --cert-wait 0 2>&1) ||
    { echo "$out" >&2; echo "servers.sh: luma deploy ($p) failed" >&2; exit 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }'
}

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m}'; }

declare -A first med
for p in one two; do
  echo "==> $p: first deploy (sends the proxy image, starts the proxy)" >&2
  first[$p]=$(deploy "$p")
  times=()
  for ((i = 1; i <= runs; i++)); do
    echo "$i" >"$work/$p/stamp"
    times+=("$(deploy "$p")")
    echo "  run $i: ${times[-1]} s" >&2
  done
  med[$p]=$(printf '%s\n' "${times[@]}" | median)
done

echo
echo "luma deploy over SSH, one app (1 replica, a new 1.6 MB image each time), median of $runs runs"
echo
echo "| servers | first deploy (proxy set up) | redeploy (build, send, check, switch, settle) |"
echo "|---|---:|---:|"
printf '| 1 (luma-s1) | %.2f s | %s s |\n' "${first[one]}" "${med[one]}"
printf '| 2 (luma-s1, luma-s2) | %.2f s | %s s |\n' "${first[two]}" "${med[two]}"
