# shellcheck shell=bash disable=SC2034
# Shared by tests/servers/up.sh and down.sh (sourced, not run): the naming scheme of a test
# topology and how to take one apart.
#
# A topology has an ID (6 hex digits) and two places:
# - DIR (given by the caller): data roots, logs, keys, ssh_config, known_hosts, env.
# - RUN=/tmp/lt-ID: what must have a short path (unix sockets, exec roots) plus pid files and
#   `state`. It is the topology's registration: down.sh finds earlier runs whose owner died by
#   globbing /tmp/lt-*/state, and still finds their pids when DIR is gone.
# Every object is named after ID, so teardown never matches anything that is not ours:
# bridges `ltIDs1`/`ltIDs2`, iptables comments `luma-test-ID-s1`, processes whose command line
# names RUN or DIR's config files, docker-proxy processes for our subnets.
#
# Address plan (slot S in 0..19, engine K = 2S+0 or 2S+1): engine bridge 10.149.K.0/24, engine
# address pool 10.(150+K).0.0/16 in /24s. It stays clear of Docker's defaults (172.17-31,
# 192.168), of the issue's hand recipe (10.213/10.214), and of every route on this machine
# (checked when a slot is claimed).

LT_LOCK=/run/lock/luma-test-servers.lock
LT_SERVERS=(s1 s2)

lt_log() { printf '%s\n' "$*" >&2; }

# Start time of a process in clock ticks (field 22 of /proc/PID/stat), or nothing.
lt_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  # The command name (field 2) may hold spaces; it is the only field in parentheses.
  stat=${stat##*) }
  set -- $stat
  printf '%s' "${20}"
}

# True when process PID is alive and its command line contains NEEDLE (so a pid reused by
# another program is never signalled).
lt_owned() {
  local pid=$1 needle=$2 cmd
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $cmd == *"$needle"* ]]
}

# True when PID has exited. A zombie counts as exited: this machine's init may take seconds to
# reap the daemons up.sh left to it.
lt_gone() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [[ ${stat:0:1} == Z ]]
}

# Waits up to SECONDS for PID to exit; true if it did.
lt_wait_gone() {
  local pid=$1 limit=$2 i
  for ((i = 0; i < limit * 20; i++)); do
    lt_gone "$pid" && return 0
    sleep 0.05
  done
  lt_gone "$pid"
}

# Stops PID (only if its command line contains NEEDLE): TERM, up to SECONDS, then KILL.
lt_stop_pid() {
  local pid=$1 needle=$2 limit=$3
  lt_owned "$pid" "$needle" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! lt_wait_gone "$pid" "$limit"; then
    lt_log "  pid $pid ($needle) ignored SIGTERM for ${limit}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    lt_wait_gone "$pid" 5 || lt_log "  pid $pid is still there after SIGKILL"
  fi
}

# Direct children of PID.
lt_children() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }

# Loads RUN/state into LT_* variables; false if it is missing or incomplete.
lt_load_state() {
  local run=$1
  LT_ID='' LT_DIR='' LT_SLOT='' LT_OWNER_PID='' LT_OWNER_START=''
  [[ -f $run/state ]] || return 1
  # state is written by up.sh as KEY=VALUE lines with plain values; read, never sourced.
  local k v
  while IFS='=' read -r k v; do
    case $k in
      ID) LT_ID=$v ;; DIR) LT_DIR=$v ;; SLOT) LT_SLOT=$v ;;
      OWNER_PID) LT_OWNER_PID=$v ;; OWNER_START) LT_OWNER_START=$v ;;
    esac
  done <"$run/state"
  [[ $LT_ID =~ ^[0-9a-f]{6}$ && $run == "/tmp/lt-$LT_ID" && $LT_SLOT =~ ^[0-9]+$ ]]
}

# The engine index K of server s1/s2 in slot SLOT.
lt_engine_index() { echo $((2 * $1 + ${2#s} - 1)); }

# True when the owner recorded in LT_OWNER_* is gone (owner 0 = started by hand: never stale).
lt_owner_dead() {
  [[ $LT_OWNER_PID == 0 ]] && return 1
  lt_gone "$LT_OWNER_PID" && return 0
  local start
  start=$(lt_starttime "$LT_OWNER_PID")
  [[ -n $start && $start == "$LT_OWNER_START" ]] && return 1
  return 0
}

# Deletes this topology's DOCKER-USER rules: those commented `luma-test-ID-...`.
lt_delete_rules() {
  local id=$1 line
  local -a rule
  while IFS= read -r line; do
    [[ $line == "-A DOCKER-USER "* && $line =~ --comment\ \"?luma-test-$id- ]] || continue
    line=${line//\"/}
    read -r -a rule <<<"$line"
    rule[0]=-D
    iptables "${rule[@]}" 2>/dev/null || lt_log "  could not delete iptables rule: $line"
  done < <(iptables -S DOCKER-USER 2>/dev/null)
}

# Unmounts everything at or below PATH, deepest first.
lt_unmount_under() {
  local root=$1 m
  [[ -n $root && $root == /* && $root != / ]] || return 0
  awk -v r="$root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || lt_log "  cannot unmount $m"
    done
}

# Kills processes left by a dead engine of ours: dockerd, containerd and shims whose command
# lines name RUN/SERVER, the containers under them (children of the shims), and docker-proxy
# processes that publish one of engine K's subnets. Other programs (a shell or a docker client
# that merely mentions the path) are never matched.
lt_sweep_processes() {
  local run=$1 k=$2 p cmd child exe
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") || continue
    exe=${cmd%% *}
    exe=${exe##*/}
    case $exe in dockerd | containerd | containerd-shim* | docker-proxy) ;; *) continue ;; esac
    if [[ $exe != docker-proxy && $cmd == *"$run/"* ]]; then
      for child in $(lt_children "$p"); do kill -KILL "$child" 2>/dev/null || true; done
      kill -KILL "$p" 2>/dev/null || true
    elif [[ $cmd == *docker-proxy*" -container-ip 10.$((150 + k))."* ||
      $cmd == *docker-proxy*" -container-ip 10.149.$k."* ]]; then
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
}

# Deletes our bridge for engine K and the br-* bridges Docker made in its pool.
lt_delete_bridges() {
  local id=$1 s=$2 k=$3 dev
  ip link del "lt${id}${s}" 2>/dev/null || true
  while read -r dev; do
    [[ $dev == br-* ]] && ip link del "$dev" 2>/dev/null || true
  done < <(ip -o -4 addr show 2>/dev/null | awk -v p="10.$((150 + k))." 'index($4, p) == 1 {print $2}')
}

# Takes apart the topology registered in RUN (DIR from its state). Safe on a partial one and
# when run twice.
lt_teardown() {
  local run=$1 dir s k pid sock
  lt_load_state "$run" || { lt_log "  $run: no usable state; leaving it alone"; return 0; }
  dir=$LT_DIR
  lt_log "tearing down topology $LT_ID ($dir)"
  for s in "${LT_SERVERS[@]}"; do
    # sshd: the per-connection children first (they outlive the listener), then the listener.
    pid=$(cat "$run/$s/sshd.pid" 2>/dev/null || true)
    if lt_owned "$pid" "$dir/$s/sshd_config"; then
      for child in $(lt_children "$pid"); do kill -KILL "$child" 2>/dev/null || true; done
      lt_stop_pid "$pid" "$dir/$s/sshd_config" 5
    fi
  done
  pid=$(cat "$run/registry.pid" 2>/dev/null || true)
  lt_stop_pid "$pid" "$dir/registry/config.yml" 10
  for s in "${LT_SERVERS[@]}"; do
    k=$(lt_engine_index "$LT_SLOT" "$s")
    sock=$run/$s/docker.sock
    pid=$(cat "$run/$s/dockerd.pid" 2>/dev/null || true)
    if lt_owned "$pid" "$run/$s/x"; then
      # Containers go first, by force: a PID 1 that ignores SIGTERM would make dockerd's own
      # shutdown wait 10 s per container. Networks next, so Docker deletes their bridges.
      local ids
      ids=$(timeout 20 docker -H "unix://$sock" ps -aq 2>/dev/null || true)
      [[ -z $ids ]] || timeout 60 docker -H "unix://$sock" rm -f -v $ids >/dev/null 2>&1 || true
      timeout 20 docker -H "unix://$sock" network prune -f >/dev/null 2>&1 || true
      local kids
      kids=$(lt_children "$pid")
      lt_stop_pid "$pid" "$run/$s/x" 30
      for child in $kids; do kill -KILL "$child" 2>/dev/null || true; done
    fi
    lt_sweep_processes "$run/$s" "$k"
  done
  for s in "${LT_SERVERS[@]}"; do
    k=$(lt_engine_index "$LT_SLOT" "$s")
    lt_delete_bridges "$LT_ID" "$s" "$k"
  done
  lt_delete_rules "$LT_ID"
  lt_unmount_under "$run"
  [[ -z $dir ]] || lt_unmount_under "$dir"
  [[ -z $dir || ! -d $dir ]] || rm -rf --one-file-system "$dir"
  rm -rf --one-file-system "$run"
}

# Objects of ours whose registration (/tmp/lt-ID/state) is gone: bridges `ltIDs1|2` and
# DOCKER-USER rules `luma-test-ID-...`. Only names of our scheme are ever matched.
lt_sweep_orphans() {
  local dev id line
  while read -r dev; do
    dev=${dev%%@*}
    [[ $dev =~ ^lt([0-9a-f]{6})s[12]$ ]] || continue
    id=${BASH_REMATCH[1]}
    [[ -e /tmp/lt-$id/state ]] && continue
    lt_log "removing leftover bridge $dev"
    ip link del "$dev" 2>/dev/null || true
  done < <(ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}')
  while IFS= read -r line; do
    [[ $line =~ --comment\ \"?luma-test-([0-9a-f]{6})-s[12] ]] || continue
    id=${BASH_REMATCH[1]}
    [[ -e /tmp/lt-$id/state ]] && continue
    lt_log "removing leftover iptables rules luma-test-$id"
    lt_delete_rules "$id"
  done < <(iptables -S DOCKER-USER 2>/dev/null)
}

# Tears down every registered topology whose owner process is gone (a run killed before its
# trap ran), then orphans. Call with the lock held.
lt_sweep_stale() {
  local state run
  for state in /tmp/lt-*/state; do
    [[ -e $state ]] || continue
    run=${state%/state}
    lt_load_state "$run" || continue
    lt_owner_dead || continue
    lt_log "topology $LT_ID ($LT_DIR) outlived its owner (pid $LT_OWNER_PID)"
    lt_teardown "$run"
  done
  lt_sweep_orphans
}
