#!/usr/bin/env bash
# Makes sure the machine's Docker engine answers before CI goes on: the integration tests never
# skip, so an engine that is missing must fail the run, but one that is merely not started yet
# (CI can begin while the machine is still booting) or was never started must not.
#
# - An engine that answers: nothing to do.
# - A dockerd process that is still starting: wait for it.
# - No dockerd process: start the installed one (as the init script would, logging to
#   /var/log/dockerd.log), clearing a pid file left by a dockerd that no longer runs, which would
#   otherwise stop it from starting.
# Fails, with the end of dockerd's log, when the engine does not answer within the wait.
set -euo pipefail

wait_seconds=${LUMA_CI_DOCKER_WAIT:-120}
log=/var/log/dockerd.log

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if answers; then
  exit 0
fi

sudo=()
[[ $(id -u) == 0 ]] || sudo=(sudo)

if ! pgrep -x dockerd >/dev/null; then
  dockerd_bin=$(command -v dockerd || true)
  if [[ -z $dockerd_bin ]]; then
    echo ".ci/docker-engine.sh: no Docker engine answers and dockerd is not installed" >&2
    exit 1
  fi
  pidfile=/var/run/docker.pid
  if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "==> removing $pidfile, left by a dockerd that no longer runs"
    "${sudo[@]}" rm -f "$pidfile"
  fi
  echo "==> no dockerd is running; starting $dockerd_bin (log: $log)"
  # setsid: the engine must outlive this script and must not share CI's process group.
  "${sudo[@]}" setsid sh -c "exec '$dockerd_bin' >>'$log' 2>&1" </dev/null &
fi

echo "==> waiting up to ${wait_seconds}s for the Docker engine to answer"
for ((i = 0; i < wait_seconds; i++)); do
  if answers; then
    echo "==> the Docker engine answers after ${i}s"
    exit 0
  fi
  if ((i > 5)) && ! pgrep -x dockerd >/dev/null; then
    break
  fi
  sleep 1
done
echo ".ci/docker-engine.sh: the Docker engine did not answer; the end of $log:" >&2
"${sudo[@]}" tail -n 30 "$log" >&2 || true
exit 1
