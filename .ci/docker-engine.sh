#!/usr/bin/env bash
# Makes sure the machine's Docker engine answers before CI goes on: the integration tests never
# skip, so an engine that is missing must fail the run, but one that is merely not started yet
# (CI can begin while the machine is still booting) or was never started must not.
#
# - An engine that answers: nothing to do.
# - A user not allowed on its socket: fail at once, with Docker's own words.
# - The machine's dockerd (the one /var/run/docker.pid names; the test servers' engines of
#   tests/servers/up.sh have pid files of their own) still starting: wait for it.
# - No such dockerd: start the installed one, logging to /var/log/dockerd.log, after removing
#   a pid file it left behind, which would otherwise stop it from starting.
# Fails, with the end of dockerd's log, when the engine does not answer within the wait.
set -euo pipefail

wait_seconds=${LUMA_CI_DOCKER_WAIT:-120}
log=/var/log/dockerd.log
pidfile=/var/run/docker.pid

# A dockerd that accepts connections but hangs must not hang CI: every probe has a deadline.
probe() { timeout 10 docker version --format '{{.Server.Version}}' 2>&1 >/dev/null; }

main_dockerd_runs() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]
}

if err=$(probe); then
  exit 0
fi
if [[ $err == *"permission denied"* ]]; then
  echo ".ci/docker-engine.sh: this user may not use the Docker engine: $err" >&2
  exit 1
fi

sudo=()
[[ $(id -u) == 0 ]] || sudo=(sudo -n)

if ! main_dockerd_runs; then
  dockerd_bin=$(PATH=$PATH:/usr/sbin:/sbin command -v dockerd || true)
  if [[ -z $dockerd_bin ]]; then
    echo ".ci/docker-engine.sh: no Docker engine answers and dockerd is not installed" >&2
    exit 1
  fi
  if [[ -e $pidfile ]]; then
    echo "==> removing $pidfile, left by a dockerd that no longer runs"
    "${sudo[@]}" rm -f "$pidfile"
  fi
  echo "==> the Docker engine is not running; starting $dockerd_bin (log: $log)"
  # setsid -f: the engine outlives this script, in a session of its own, holding none of CI's
  # output open and getting none of its signals.
  setsid -f "${sudo[@]}" sh -c "exec '$dockerd_bin' >>'$log' 2>&1" </dev/null >/dev/null 2>&1
fi

echo "==> waiting up to ${wait_seconds}s for the Docker engine to answer"
for ((i = 0; i < wait_seconds; i++)); do
  if probe >/dev/null; then
    echo "==> the Docker engine answers after ${i}s"
    exit 0
  fi
  # Give a fresh dockerd a few seconds to write its pid file before calling it dead.
  if ((i > 5)) && ! main_dockerd_runs; then
    echo ".ci/docker-engine.sh: dockerd exited while starting" >&2
    break
  fi
  sleep 1
done
echo ".ci/docker-engine.sh: the Docker engine did not answer; the end of $log:" >&2
"${sudo[@]}" tail -n 30 "$log" >&2 || true
exit 1
