#!/usr/bin/env bash
# Removes the test topology that tests/servers/up.sh started in DIR: sshd (and its sessions),
# the registry, both engines (their containers first, then dockerd by pid, bounded), the
# DOCKER-USER rules, the bridges, the mounts, DIR and its runtime dir /tmp/lt-ID.
# Then removes leftovers of earlier runs that were killed before their own teardown: topologies
# whose owner process is gone, and bridges/rules of our naming scheme whose registration is gone
# (see tests/servers/lib.sh). Nothing else is touched.
#
# Usage: tests/servers/down.sh [DIR]   (no DIR: only the leftovers). Safe after a partial up.sh
# and when run twice. Exits 1 if something of DIR's topology is still there afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/servers/lib.sh
. "$here/lib.sh"

if [[ $# -gt 1 ]]; then
  echo "usage: $0 [DIR]" >&2
  exit 2
fi
[[ $(id -u) == 0 ]] || { echo "down.sh: needs root" >&2; exit 1; }

run=''
if [[ $# == 1 && -n $1 ]]; then
  dir=$1
  if [[ -d $dir ]]; then
    dir=$(cd "$dir" && pwd)
    run=$(cat "$dir/rundir" 2>/dev/null || true)
  fi
fi

exec 9>"$LT_LOCK"
flock -w 120 9 || { echo "down.sh: $LT_LOCK held for 120 s by another up.sh/down.sh" >&2; exit 1; }
if [[ -n $run ]]; then
  [[ $run =~ ^/tmp/lt-[0-9a-f]{6}$ ]] || { echo "down.sh: $dir/rundir names $run, not ours" >&2; exit 1; }
  if [[ -e $run/state ]]; then
    lt_teardown "$run"
  fi
fi
if [[ -n ${dir:-} && -d $dir ]]; then
  # up.sh stopped before registering, or the runtime dir was already gone. Only a directory
  # up.sh wrote to (its log is the first thing it makes) is removed: a mistyped DIR is not.
  if [[ -e $dir/up.log || -e $dir/rundir ]]; then
    lt_unmount_under "$dir"
    rm -rf --one-file-system "$dir"
  else
    echo "down.sh: $dir holds no topology of up.sh (no up.log); left as it is" >&2
  fi
fi
lt_sweep_stale
exec 9>&-

left=''
if [[ -n $run ]]; then
  id=${run#/tmp/lt-}
  [[ ! -e $run ]] || left+=" $run"
  [[ -z ${dir:-} || ! -e $dir ]] || left+=" $dir"
  ! ip link show "lt${id}s1" >/dev/null 2>&1 || left+=" bridge lt${id}s1"
  ! ip link show "lt${id}s2" >/dev/null 2>&1 || left+=" bridge lt${id}s2"
  ! iptables -S DOCKER-USER 2>/dev/null | grep -q "luma-test-$id-" || left+=" iptables luma-test-$id"
  ! grep -q "$run/" /proc/mounts || left+=" mounts under $run"
fi
if [[ -n $left ]]; then
  echo "down.sh: still there after teardown:$left" >&2
  exit 1
fi
