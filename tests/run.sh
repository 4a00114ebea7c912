#!/usr/bin/env bash
# Runs every test: unit, in-process loopback, and the Docker integration tests against the real
# engine. Builds the images first (FROM scratch, no registry). Docker missing is a failure.
# The SSH tests get two more engines behind real sshd and a registry (tests/servers/up.sh),
# started before `cargo test` and removed on exit; if they do not start, the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "tests/run.sh: the Docker engine is not reachable; the integration tests need it." >&2
  exit 1
fi
docker/build-images.sh dev
# The HTTPS tests (docker_tls) run pebble from an image made of the host's Debian packages;
# building it here fails early and clearly when they are missing (the tests reuse it).
docker/pebble/image.sh >/dev/null
# The Docker CLI tests run the `luma` binary itself.
cargo build --workspace --locked
# Scale smoke: 4 projects behind one proxy, each host answers 200, all removed (about 30 s).
python3 benches/scale.py --smoke --bin-dir target/debug
# Idle-memory smoke: 200 idle HTTP/1.1, h2c and WebSocket connections through luma-proxy, nginx
# and HAProxy; fails on a connection that failed or was closed early, never on a figure (~20 s).
cargo build --release --locked -p luma-proxy -p luma-demo-backend -p luma-benches
python3 benches/idle.py --smoke
log=$(mktemp)
topology=$(mktemp -d)
# Removes the servers whatever happens; something left behind fails the run.
cleanup() {
  local status=$?
  rm -f "$log"
  if ! tests/servers/down.sh "$topology"; then
    echo "tests/run.sh: tests/servers/down.sh could not remove the test servers (see above)" >&2
    ((status)) || status=1
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if ! tests/servers/up.sh "$topology"; then
  echo "tests/run.sh: the test servers (tests/servers/up.sh) did not start; the SSH tests need them." >&2
  exit 1
fi
# shellcheck disable=SC1091
. "$topology/env"
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
