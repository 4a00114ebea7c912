#!/usr/bin/env bash
# Image transfer to a server over SSH: luma's own streaming against the classic
# `docker save IMG | ssh SERVER docker load`, on the test topology of tests/servers/up.sh
# (a second engine on this machine behind a real sshd, so the numbers are CPU and ssh bound,
# not network bound).
#
# It makes a throwaway image of SIZE_MB (default 256) MB of random data (incompressible) plus a
# static busybox that serves /up, so a deploy of it can pass the health check. Each of RUNS
# (default 3) rounds first removes the image from both servers, so every run transfers all of it:
#   (a) times `docker save IMG | ssh -F CFG luma-s1 docker load`;
#   (b) runs `luma deploy` of a minimal luma.yml (`image: IMG`, `server: luma-s1`) and reads
#       luma's own line `  ✓ luma-s1: sent IMAGE (256.0 MB in 2.1s, 121.9 MB/s)`.
# Prints a table of medians (MB/s and seconds for each, and the speed ratio luma / save|load,
# from the seconds, so both sides measure the same bytes) and removes everything it made.
#
# Usage: benches/transfer.sh    (SIZE_MB, RUNS; LUMA_BIN for another luma build;
#        LUMA_TEST_TOPOLOGY=DIR to use a running topology instead of starting one)
# Part (b) needs `luma deploy` over SSH (issue 10): without it, (b) says so and the script
# exits 1 after printing (a).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${SIZE_MB:-256}
runs=${RUNS:-3}
tag="lumabench-xfer-$$"
image="$tag:1"
server="luma-s1"
work=$(mktemp -d)
topology=''
started_topology=0
luma_failed=0

cleanup() {
  local status=$?
  set +e
  if [[ -n ${DOCKER_S1:-} ]]; then
    if [[ -x ${luma:-} && -f $work/luma.yml ]]; then
      LUMA_SSH_CONFIG=$LUMA_TEST_SSH_CONFIG "$luma" -c "$work/luma.yml" remove --yes >/dev/null 2>&1
    fi
    for h in "$DOCKER_S1" "$DOCKER_S2"; do
      docker -H "$h" ps -aq --filter "label=luma.project=$tag" | xargs -r docker -H "$h" rm -f -v >/dev/null 2>&1
      docker -H "$h" rm -f -v "$tag-proxy" >/dev/null 2>&1
      docker -H "$h" volume rm "$tag-proxy-state" >/dev/null 2>&1
      docker -H "$h" network rm "$tag-network" >/dev/null 2>&1
      [[ -z ${image_id:-} ]] || docker -H "$h" rmi -f "$image_id" >/dev/null 2>&1
    done
  fi
  docker rmi -f "$image" >/dev/null 2>&1
  rm -rf "$work"
  if ((started_topology)); then
    tests/servers/down.sh "$topology" || status=1
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> luma and images" >&2
docker/build-images.sh dev >/dev/null
if [[ -z ${LUMA_BIN:-} ]]; then
  cargo build --release --locked -p luma-cli >/dev/null 2>&1 ||
    { echo "transfer.sh: cargo build --release -p luma-cli failed" >&2; exit 1; }
fi
luma=${LUMA_BIN:-$PWD/target/release/luma}

echo "==> test servers" >&2
if [[ -n ${LUMA_TEST_TOPOLOGY:-} ]]; then
  topology=$LUMA_TEST_TOPOLOGY
  [[ -f $topology/env ]] || { echo "transfer.sh: $topology/env is missing" >&2; exit 1; }
else
  topology=$(mktemp -d)
  started_topology=1
  tests/servers/up.sh "$topology"
fi
# shellcheck disable=SC1091
. "$topology/env"
# shellcheck disable=SC2154 # from the env file
DOCKER_S1=$LUMA_TEST_DOCKER_HOST_luma_s1
# shellcheck disable=SC2154
DOCKER_S2=$LUMA_TEST_DOCKER_HOST_luma_s2
cfg=$LUMA_TEST_SSH_CONFIG

echo "==> a $size_mb MB image of random data ($image)" >&2
mkdir -p "$work/root/bin" "$work/root/w"
cp /bin/busybox "$work/root/bin/busybox"
echo ok >"$work/root/w/up"
head -c "$((size_mb * 1024 * 1024))" /dev/urandom >"$work/root/blob"
tar -C "$work/root" -c . |
  docker import --change 'CMD ["/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/w"]' - "$image" >/dev/null
rm -rf "$work/root"
image_id=$(docker image inspect -f '{{.Id}}' "$image")
bytes=$(docker save "$image" | wc -c)

cat >"$work/luma.yml" <<YAML
name: $tag
apps:
  web:
    image: $image
    server: $server
    health_check:
      path: /up
    proxy:
      hosts: [$tag.test]
      app_port: 3000
      ssl: false
YAML
export LUMA_PROXY_NAME="$tag-proxy" LUMA_HTTP_PORT=127.0.0.1:0 LUMA_HTTPS_PORT=127.0.0.1:0
# The host's firewall outlives this bench: luma's fast-path rule (luma-cli/src/hostpath.rs) stays off.
export LUMA_HOST_FAST_PATH=off

# Leaves the servers without the image (and without the app using it), so the next run sends it.
forget_image() {
  if [[ -f $work/deployed ]]; then
    LUMA_SSH_CONFIG=$cfg "$luma" -c "$work/luma.yml" remove --yes >/dev/null 2>&1 || true
    rm -f "$work/deployed"
  fi
  local h
  for h in "$DOCKER_S1" "$DOCKER_S2"; do
    docker -H "$h" ps -aq --filter "label=luma.project=$tag" | xargs -r docker -H "$h" rm -f -v >/dev/null
    docker -H "$h" rmi -f "$image_id" >/dev/null 2>&1 || true
    if docker -H "$h" image inspect "$image_id" >/dev/null 2>&1; then
      echo "transfer.sh: cannot remove the image from $h" >&2
      exit 1
    fi
  done
}

plain_s=() luma_s=() luma_rate=()
for i in $(seq "$runs"); do
  forget_image
  start=$(date +%s%N)
  docker save "$image" | ssh -F "$cfg" "$server" docker load -q >/dev/null
  end=$(date +%s%N)
  plain_s+=("$(awk -v ns=$((end - start)) 'BEGIN { printf "%.3f", ns / 1e9 }')")
  echo "  run $i: save|ssh|load ${plain_s[-1]} s" >&2

  forget_image
  if ((luma_failed)); then continue; fi
  touch "$work/deployed"
  set +e
  out=$(LUMA_SSH_CONFIG=$cfg "$luma" -c "$work/luma.yml" deploy --force --cert-wait 0 2>&1)
  rc=$?
  set -e
  # `  ✓ luma-s1: sent IMAGE (256.0 MB in 2.1s, 121.9 MB/s)`; the proxy image may be sent too.
  line=$(grep -E "$server: sent .*\\(.* in [0-9.]+s, [0-9.]+ MB/s\\)" <<<"$out" | grep -v luma-proxy | head -1 || true)
  if [[ -z $line ]]; then
    echo "transfer.sh: luma deploy (exit $rc) printed no '$server: sent $image (...)' line." >&2
    echo "  This needs luma's SSH transfer (issue 10). Its output:" >&2
    sed 's/^/    /' <<<"$out" | tail -n 20 >&2
    luma_failed=1
    continue
  fi
  luma_s+=("$(sed -E 's/.* in ([0-9.]+)s, .*/\1/' <<<"$line")")
  luma_rate+=("$(sed -E 's/.*, ([0-9.]+) MB\/s\).*/\1/' <<<"$line")")
  echo "  run $i: luma ${luma_s[-1]} s (${luma_rate[-1]} MB/s; deploy exit $rc)" >&2
done
forget_image

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
p=$(median "${plain_s[@]}")
echo
echo "Image transfer to $server over SSH: $mb MB (docker save size, random data), median of $runs runs"
echo
echo "| method | seconds | MB/s |"
echo "|---|---:|---:|"
awk -v s="$p" -v b="$bytes" 'BEGIN { printf "| docker save \\| ssh docker load | %.2f | %.1f |\n", s, b / 1e6 / s }'
if ((luma_failed)) || ((${#luma_s[@]} == 0)); then
  echo "| luma deploy (streamed) | n/a | n/a |"
  echo
  echo "luma's transfer could not be measured (see above)."
  exit 1
fi
l=$(median "${luma_s[@]}")
r=$(median "${luma_rate[@]}")
awk -v s="$l" -v r="$r" 'BEGIN { printf "| luma deploy (streamed) | %.2f | %.1f (as luma reports it) |\n", s, r }'
echo
awk -v p="$p" -v l="$l" 'BEGIN { printf "luma / save|load speed: %.2fx (from the seconds)\n", p / l }'
