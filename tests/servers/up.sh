#!/usr/bin/env bash
# Starts the multi-server test topology of issue 10 on this one machine, into DIR:
# - two extra Docker engines ("servers" luma-s1 and luma-s2), each on a bridge and address pool
#   of its own, with a DOCKER-USER rule so its containers reach each other (the host's FORWARD
#   policy is DROP and these engines run with --iptables=false);
# - one real sshd per engine on 127.0.0.1:<free port> whose sessions get DOCKER_HOST of that
#   engine (sshd_config SetEnv), so `ssh luma-s1 docker ...` talks to engine 1;
# - a docker-registry 2.8 on 127.0.0.1:<free port> with htpasswd (bcrypt) auth;
# - DIR/ssh_config (Host luma-s1, luma-s2, plus luma-s1-unknown with an empty known_hosts and
#   luma-s1-changed with a wrong key for s1), DIR/known_hosts, the client key DIR/client_key,
#   and DIR/env: `export` lines of the LUMA_TEST_* variables tests/support/servers.rs reads.
#
# Usage: tests/servers/up.sh DIR      (DIR: new or empty; tests/servers/down.sh DIR undoes it)
# The engines start empty: no image is on them until a test or luma sends one.
# The topology belongs to the calling process (LUMA_TEST_OWNER_PID, default the parent): once
# that process is gone, the next up.sh or down.sh removes it as a leftover. Set
# LUMA_TEST_OWNER_PID=0 for a topology started by hand (then only down.sh DIR removes it).
# On failure it prints the failing step with the log that explains it, removes what it made
# (LUMA_TEST_KEEP_FAILED=1 keeps it for a look) and exits 1. Logs: DIR/*.log, DIR/s*/*.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/servers/lib.sh
. "$here/lib.sh"

if [[ $# -ne 1 || -z $1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
started=$(date +%s%N)
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
if [[ -n $(ls -A "$DIR") ]]; then
  echo "up.sh: $DIR is not empty; give a new or empty directory" >&2
  exit 2
fi
owner=${LUMA_TEST_OWNER_PID:-$PPID}
if ! [[ $owner =~ ^[0-9]+$ ]]; then
  echo "up.sh: LUMA_TEST_OWNER_PID must be a pid or 0, not $owner" >&2
  exit 2
fi
exec 3>>"$DIR/up.log"
say() { printf 'up.sh: %s\n' "$*" >&2; printf '%s %s\n' "$(date +%T.%N)" "$*" >&3; }

RUN=''
ok=0
fail() {
  local msg=$1 log=${2:-}
  printf '\nup.sh: FAILED: %s\n' "$msg" >&2
  if [[ -n $log && -f $log ]]; then
    printf -- '--- last lines of %s ---\n' "$log" >&2
    tail -n 40 "$log" >&2
    printf -- '---\n' >&2
  fi
  exit 1
}
# Whatever stops this script before the end (fail, set -e, a signal) removes what it made.
on_exit() {
  ((ok)) && return
  [[ -n $RUN ]] || return 0
  if [[ ${LUMA_TEST_KEEP_FAILED:-0} == 1 ]]; then
    printf 'up.sh: kept for a look (LUMA_TEST_KEEP_FAILED=1); remove with %s/down.sh %s\n' \
      "$here" "$DIR" >&2
  else
    lt_teardown "$RUN" 2>&1 | sed 's/^/up.sh: /' >&2 || true
  fi
}
trap on_exit EXIT
trap 'printf "up.sh: FAILED at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR
trap 'exit 1' INT TERM HUP

# --- prerequisites: what .ci/run installs ------------------------------------------------------
need=(dockerd:docker.io docker:docker-cli /usr/sbin/sshd:openssh-server ssh:openssh-client
  ssh-keygen:openssh-client docker-registry:docker-registry htpasswd:apache2-utils
  iptables:iptables ip:iproute2 curl:curl python3:python3 flock:util-linux)
for n in "${need[@]}"; do
  command -v "${n%%:*}" >/dev/null || fail "${n%%:*} is missing (Debian package ${n#*:}; .ci/run installs it)"
done
[[ $(id -u) == 0 ]] || fail "needs root (bridges, iptables, dockerd)"
iptables -S DOCKER-USER >/dev/null 2>&1 ||
  fail "iptables chain DOCKER-USER is missing: the main Docker engine (with its iptables rules) must run"
# sshd_config SetEnv came with OpenSSH 8.7.
sshd_version=$(/usr/sbin/sshd -V 2>&1 | sed -n 's/^OpenSSH_\([0-9]*\.[0-9]*\).*/\1/p' | head -1)
[[ -n $sshd_version ]] && awk -v v="$sshd_version" 'BEGIN { exit !(v + 0 >= 8.7) }' ||
  fail "sshd ${sshd_version:-of unknown version} lacks SetEnv (needs OpenSSH >= 8.7)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- claim an ID and an address slot, create bridges and rules (under the lock) -----------------
exec 9>"$LT_LOCK"
flock -w 120 9 || fail "another up.sh/down.sh held $LT_LOCK for 120 s"
lt_sweep_stale 2>&1 | sed 's/^/up.sh: /' >&2
while :; do
  ID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  [[ -e /tmp/lt-$ID ]] || break
done
RUN=/tmp/lt-$ID
routes=$(ip -4 route show table all 2>/dev/null; ip -4 addr show; iptables -S DOCKER-USER 2>/dev/null)
claimed=$(cat /tmp/lt-*/state 2>/dev/null | sed -n 's/^SLOT=//p' || true)
slot=''
for s in $(seq 0 19); do
  grep -qx "$s" <<<"$claimed" && continue
  busy=0
  for srv in "${LT_SERVERS[@]}"; do
    k=$(lt_engine_index "$s" "$srv")
    grep -qE "(^|[^0-9])10\.(149\.$k|$((150 + k)))\." <<<"$routes" && busy=1
  done
  ((busy)) || { slot=$s; break; }
done
[[ -n $slot ]] || fail "no free address slot (10.149.K.0/24 + 10.(150+K).0.0/16 all in use)"
mkdir -m 0700 "$RUN"
printf '%s\n' "$RUN" >"$DIR/rundir"
{
  echo "ID=$ID"
  echo "DIR=$DIR"
  echo "SLOT=$slot"
  echo "OWNER_PID=$owner"
  echo "OWNER_START=$( ((owner)) && lt_starttime "$owner" || true)"
} >"$RUN/state.tmp"
mv "$RUN/state.tmp" "$RUN/state"
say "topology $ID in $DIR (runtime $RUN, slot $slot, owner pid $owner)"
for srv in "${LT_SERVERS[@]}"; do
  k=$(lt_engine_index "$slot" "$srv")
  br=lt${ID}${srv}
  mkdir -m 0700 "$RUN/$srv"
  mkdir -p "$DIR/$srv"
  ip link add name "$br" type bridge
  ip addr add "10.149.$k.1/24" dev "$br"
  ip link set "$br" up
  # Containers of this engine reach each other across its bridges only through this ACCEPT:
  # bridged traffic goes through iptables FORWARD, whose policy here is DROP.
  iptables -I DOCKER-USER -s "10.$((150 + k)).0.0/16" -d "10.$((150 + k)).0.0/16" \
    -m comment --comment "luma-test-$ID-$srv" -j ACCEPT
  iptables -I DOCKER-USER -s "10.149.$k.0/24" -d "10.149.$k.0/24" \
    -m comment --comment "luma-test-$ID-$srv" -j ACCEPT
  say "$srv: bridge $br 10.149.$k.1/24, pool 10.$((150 + k)).0.0/16"
done
exec 9>&- # no daemon started below may inherit the lock

# --- engines -------------------------------------------------------------------------------------
declare -A engine_pid
for srv in "${LT_SERVERS[@]}"; do
  k=$(lt_engine_index "$slot" "$srv")
  echo '{}' >"$DIR/$srv/daemon.json"
  # Never --bridge=none: it deletes the host's docker0 and breaks the main engine.
  setsid /usr/sbin/dockerd --config-file "$DIR/$srv/daemon.json" \
    --data-root "$DIR/$srv/data" --exec-root "$RUN/$srv/x" --pidfile "$RUN/$srv/dockerd.pidfile" \
    -H "unix://$RUN/$srv/docker.sock" --bridge="lt${ID}${srv}" --iptables=false --ip-masq=false \
    --default-address-pool "base=10.$((150 + k)).0.0/16,size=24" \
    </dev/null >"$DIR/$srv/dockerd.log" 2>&1 &
  engine_pid[$srv]=$!
  echo "${engine_pid[$srv]}" >"$RUN/$srv/dockerd.pid"
done
for srv in "${LT_SERVERS[@]}"; do
  for ((i = 0; ; i++)); do
    version=$(docker -H "unix://$RUN/$srv/docker.sock" version --format '{{.Server.Version}}' 2>/dev/null) && break
    ! lt_gone "${engine_pid[$srv]}" || fail "dockerd of $srv exited while starting" "$DIR/$srv/dockerd.log"
    ((i < 600)) || fail "dockerd of $srv did not answer within 60 s" "$DIR/$srv/dockerd.log"
    sleep 0.1
  done
  say "$srv: engine $version up (pid ${engine_pid[$srv]}, unix://$RUN/$srv/docker.sock)"
done

# --- keys ----------------------------------------------------------------------------------------
ssh-keygen -q -t ed25519 -N '' -C luma-test-client -f "$DIR/client_key"
ssh-keygen -q -t ed25519 -N '' -C luma-test-wrong -f "$DIR/wrong_host_key"
for srv in "${LT_SERVERS[@]}"; do
  ssh-keygen -q -t ed25519 -N '' -C "luma-$srv" -f "$DIR/$srv/host_key"
  cp "$DIR/client_key.pub" "$DIR/$srv/authorized_keys"
done

# --- sshd per engine -----------------------------------------------------------------------------
mkdir -p /run/sshd # privilege separation directory; Debian's package makes it at boot only
chmod 0755 /run/sshd
declare -A ssh_port sshd_pid
for srv in "${LT_SERVERS[@]}"; do
  for attempt in 1 2 3; do
    port=$(free_port)
    cat >"$DIR/$srv/sshd_config" <<EOF
# sshd of test server luma-$srv (tests/servers/up.sh)
ListenAddress 127.0.0.1
Port $port
HostKey $DIR/$srv/host_key
PidFile $RUN/$srv/sshd.pid
AuthorizedKeysFile $DIR/$srv/authorized_keys
# The key files live under /tmp (mode 1777), which StrictModes would refuse.
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
# Sessions talk to this server's engine, and keep docker CLI state (logins) of their own: all
# test servers are root on one machine and would otherwise share /root/.docker.
SetEnv DOCKER_HOST=unix://$RUN/$srv/docker.sock DOCKER_CONFIG=$DIR/$srv/docker-config
EOF
    /usr/sbin/sshd -t -f "$DIR/$srv/sshd_config" >>"$DIR/$srv/sshd.log" 2>&1 ||
      fail "sshd_config of $srv is invalid" "$DIR/$srv/sshd.log"
    setsid /usr/sbin/sshd -D -e -f "$DIR/$srv/sshd_config" </dev/null >>"$DIR/$srv/sshd.log" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN/$srv/sshd.pid"
    up=0
    for ((i = 0; i < 100; i++)); do
      grep -q "Server listening on 127.0.0.1 port $port" "$DIR/$srv/sshd.log" && { up=1; break; }
      ! lt_gone "$pid" || break
      sleep 0.1
    done
    ((up)) && break
    kill "$pid" 2>/dev/null || true
    say "$srv: sshd did not listen on port $port (attempt $attempt)"
    ((attempt < 3)) || fail "sshd of $srv never listened" "$DIR/$srv/sshd.log"
  done
  ssh_port[$srv]=$port
  sshd_pid[$srv]=$pid
  say "$srv: sshd on 127.0.0.1:$port (pid $pid)"
done

# --- client side: known_hosts and ssh_config ----------------------------------------------------
: >"$DIR/known_hosts"
for srv in "${LT_SERVERS[@]}"; do
  printf '[127.0.0.1]:%s %s\n' "${ssh_port[$srv]}" "$(cut -d' ' -f1,2 "$DIR/$srv/host_key.pub")" \
    >>"$DIR/known_hosts"
done
: >"$DIR/known_hosts.empty"
printf '[127.0.0.1]:%s %s\n' "${ssh_port[s1]}" "$(cut -d' ' -f1,2 "$DIR/wrong_host_key.pub")" \
  >"$DIR/known_hosts.changed"
cat >"$DIR/ssh_config" <<EOF
# Test servers of tests/servers/up.sh. Use with ssh -F $DIR/ssh_config (LUMA_SSH_CONFIG).
# The first value ssh finds wins, so the special known_hosts files come before the shared one.
Host luma-s1-unknown
  UserKnownHostsFile $DIR/known_hosts.empty
Host luma-s1-changed
  UserKnownHostsFile $DIR/known_hosts.changed
Host luma-s1 luma-s1-unknown luma-s1-changed
  HostName 127.0.0.1
  Port ${ssh_port[s1]}
Host luma-s2
  HostName 127.0.0.1
  Port ${ssh_port[s2]}
Host luma-s1 luma-s2 luma-s1-unknown luma-s1-changed
  User root
  IdentityFile $DIR/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $DIR/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  BatchMode yes
EOF

# --- registry --------------------------------------------------------------------------------------
mkdir -p "$DIR/registry/data"
reg_user=luma
reg_password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
# bcrypt, as the registry requires; the password goes in on stdin, never on a command line.
printf '%s\n' "$reg_password" | htpasswd -B -i -c "$DIR/registry/htpasswd" "$reg_user" 2>>"$DIR/registry/registry.log" ||
  fail "htpasswd could not write the registry's password file" "$DIR/registry/registry.log"
for attempt in 1 2 3; do
  reg_port=$(free_port)
  cat >"$DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  fields:
    service: luma-test-registry
storage:
  filesystem:
    rootdirectory: $DIR/registry/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$reg_port
  secret: $(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
auth:
  htpasswd:
    realm: luma-test
    path: $DIR/registry/htpasswd
EOF
  chmod 0600 "$DIR/registry/config.yml"
  setsid docker-registry serve "$DIR/registry/config.yml" </dev/null >>"$DIR/registry/registry.log" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/registry.pid"
  code=''
  for ((i = 0; i < 100; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$reg_port/v2/" || true)
    [[ $code == 401 ]] && break
    ! lt_gone "$pid" || break
    sleep 0.1
  done
  [[ $code == 401 ]] && break
  kill "$pid" 2>/dev/null || true
  say "registry did not answer on port $reg_port (attempt $attempt)"
  ((attempt < 3)) || fail "docker-registry never answered" "$DIR/registry/registry.log"
done
code=$(printf 'user = "%s:%s"\n' "$reg_user" "$reg_password" |
  curl -s -K - -o /dev/null -w '%{http_code}' "http://127.0.0.1:$reg_port/v2/")
[[ $code == 200 ]] || fail "registry refused the test credentials (HTTP $code)" "$DIR/registry/registry.log"
say "registry 127.0.0.1:$reg_port (pid $pid, user $reg_user)"

# --- env ---------------------------------------------------------------------------------------------
{
  printf 'export LUMA_TEST_TOPOLOGY=%q\n' "$DIR"
  printf 'export LUMA_TEST_SSH_CONFIG=%q\n' "$DIR/ssh_config"
  printf 'export LUMA_TEST_SSH_KEY=%q\n' "$DIR/client_key"
  printf 'export LUMA_TEST_KNOWN_HOSTS=%q\n' "$DIR/known_hosts"
  printf 'export LUMA_TEST_SERVERS=%q\n' "luma-s1 luma-s2"
  # Luma's pool: the upper half of the first engine's address pool. Only addresses inside an
  # engine's /16 are let through the host's FORWARD chain (the DOCKER-USER rules above accept
  # source and destination both inside one), on either engine's bridges; and the engines
  # hand out their own /24s from the bottom of their /16s, so none of them is one luma hands
  # out too.
  printf 'export LUMA_TEST_NETWORK_POOL=%q\n' "10.$((150 + 2 * slot)).128.0/17"
  for srv in "${LT_SERVERS[@]}"; do
    printf 'export LUMA_TEST_DOCKER_HOST_luma_%s=%q\n' "$srv" "unix://$RUN/$srv/docker.sock"
    printf 'export LUMA_TEST_SSHD_PID_luma_%s=%q\n' "$srv" "${sshd_pid[$srv]}"
    printf 'export LUMA_TEST_SSH_PORT_luma_%s=%q\n' "$srv" "${ssh_port[$srv]}"
  done
  printf 'export LUMA_TEST_REGISTRY=%q\n' "127.0.0.1:$reg_port"
  printf 'export LUMA_TEST_REGISTRY_USER=%q\n' "$reg_user"
  printf 'export LUMA_TEST_REGISTRY_PASSWORD=%q\n' "$reg_password"
} >"$DIR/env.tmp"
chmod 0600 "$DIR/env.tmp"
mv "$DIR/env.tmp" "$DIR/env"

# --- check: each name reaches its own engine over real ssh --------------------------------------
for srv in "${LT_SERVERS[@]}"; do
  root=$(ssh -F "$DIR/ssh_config" "luma-$srv" docker info --format '{{.DockerRootDir}}' 2>>"$DIR/up.log") ||
    fail "ssh luma-$srv docker info failed" "$DIR/up.log"
  [[ $root == "$DIR/$srv/data" ]] ||
    fail "ssh luma-$srv reached the engine at $root, not $DIR/$srv/data" "$DIR/$srv/sshd.log"
done
ms=$((($(date +%s%N) - started) / 1000000))
ok=1
say "ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s: . $DIR/env (ssh -F $DIR/ssh_config luma-s1 docker ...)"
