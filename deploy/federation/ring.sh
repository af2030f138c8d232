#!/usr/bin/env bash
# Four Switchboard domains in a ring, 1 - 2 - 3 - 4 - 1, on one machine: the
# walkthrough of docs/federation.md. One etcd holds the federation topology
# (deploy/federation/ring.yaml with this run's ports) and each domain's own
# keys; every domain is one `switchboard run` (all roles, its own store)
# with a federation port of its own.
#
#   domain-01 … domain-04   clients ws://127.0.0.1:PORT/ws, federation
#                           grpc://127.0.0.1:PORT, /metrics on the client port
#
#   ring.sh start [DIR]   start in DIR (default: a new temp dir), apply the
#                         topology, wait until every domain answers /readyz
#                         with 200, print the URLs and return
#   ring.sh stop DIR      stop what `start` started in DIR (SIGTERM, then
#                         SIGKILL after 15 s); removes DIR if start made it
#   ring.sh run           start in a temp dir, wait for Ctrl-C or SIGTERM, stop
#
# DIR holds: pids (`name pid` per line), env (shell-sourceable: ETCD, D1_URL
# … D4_URL, D1_ADDR … D4_ADDR, FEDERATION_SECRET, SWITCHBOARD_BIN), ring.yaml
# (the topology applied), NAME.log for every process and each domain's data
# dir DIR/NAME.
#
# Environment:
#   SWITCHBOARD_BIN          binary to run (default: target/release/switchboard,
#                            else target/debug/switchboard, else it is built
#                            with `cargo build --release -p switchboard`)
#   SWITCHBOARD_FEDERATION_SECRET  the links' credential (default: random)
#   SWITCHBOARD_LOG          log filter of the switchboard processes
#
# etcd is installed with apt-get if missing (Debian's etcd-server package;
# with sudo when not root).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
self=$0

READY_TIMEOUT=30   # seconds for the gateways to become ready
STOP_TIMEOUT=15    # seconds from SIGTERM to SIGKILL
MARKER=.created-by-ring-sh

# The domains, in start order.
NODES=(domain-01 domain-02 domain-03 domain-04)

log() { printf '[ring.sh] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  cat >&2 <<EOF
usage: $self start [DIR]   start four domains in DIR (default: a new temp dir) and return
       $self stop DIR      stop the domains started in DIR
       $self run           start in a temp dir, stop on Ctrl-C / SIGTERM
EOF
  exit 2
}

# --- tools -----------------------------------------------------------------

ensure_services() {
  local need=()
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    local sudo=""
    [[ $(id -u) == 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is needed (to pick free ports)"
}

resolve_bin() {
  local bin=${SWITCHBOARD_BIN:-}
  if [[ -n $bin ]]; then
    # Relative to the current directory, else to the repo root.
    if [[ $bin != /* && ! -e $bin && -e $root/$bin ]]; then bin=$root/$bin; fi
    [[ -x $bin ]] || die "SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable file"
  elif [[ -x $root/target/release/switchboard ]]; then
    bin=$root/target/release/switchboard
  elif [[ -x $root/target/debug/switchboard ]]; then
    bin=$root/target/debug/switchboard
  else
    log "no switchboard binary: building it with cargo build --release -p switchboard"
    (cd "$root" && cargo build --release -p switchboard) >&2
    bin=$root/target/release/switchboard
  fi
  BIN=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
}

# N distinct free loopback ports, one per line (all bound at once, so they
# differ; another program may still take one before we do).
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}

random_secret() {
  od -An -tx1 -N16 /dev/urandom | tr -d ' \n'
}

# --- processes -------------------------------------------------------------

# Alive and not a zombie (kill -0 reports zombies as alive).
proc_alive() {
  [[ -e /proc/$1 ]] || return 1
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $1}') || return 1
  [[ -n $state && $state != Z ]]
}

# Start time of PID in clock ticks since boot (field 22 of /proc/PID/stat);
# with the PID it names one process, whatever PID reuse happens later.
proc_start_time() {
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'
}

# launch NAME CMD...: starts CMD detached (own session, stdin /dev/null,
# output to $DIR/NAME.log), records it in $DIR/pids and PID[NAME].
launch() {
  local name=$1; shift
  local pidfile=$DIR/.pid.$name
  rm -f "$pidfile"
  # shellcheck disable=SC2016 # expanded by the inner bash
  local wrapper='echo $$ >"$0"; exec "$@"'
  if command -v setsid >/dev/null 2>&1; then
    setsid bash -c "$wrapper" "$pidfile" "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  else
    nohup bash -c "$wrapper" "$pidfile" "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  fi
  local i pid=""
  for i in $(seq 1 100); do
    [[ -s $pidfile ]] && pid=$(<"$pidfile") && [[ -n $pid ]] && break
    sleep 0.02
  done
  rm -f "$pidfile"
  [[ -n $pid ]] || fail "$name" "$name did not start"
  printf '%s %s\n' "$name" "$pid" >>"$DIR/pids"
  printf '%s %s\n' "$pid" "$(proc_start_time "$pid")" >>"$DIR/.starttimes"
  STARTED+=("$name")
  PID[$name]=$pid
}

# Whether PID is still the process that was started (not a reused PID).
ours() { # dir pid
  local recorded now
  recorded=$(awk -v p="$2" '$1 == p {print $2}' "$1/.starttimes" 2>/dev/null | tail -n 1) || true
  [[ -n $recorded ]] || return 0
  now=$(proc_start_time "$2") || true
  [[ $now == "$recorded" ]]
}

# terminate DIR PID...: SIGTERM to all, wait up to STOP_TIMEOUT, then SIGKILL.
terminate() {
  local dir=$1; shift
  local pid live=()
  for pid in "$@"; do
    proc_alive "$pid" || continue
    if ! ours "$dir" "$pid"; then
      log "pid $pid is no longer a process started here: left alone"
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    live+=("$pid")
  done
  local deadline=$((SECONDS + STOP_TIMEOUT))
  for pid in "${live[@]}"; do
    while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
    if proc_alive "$pid"; then
      log "pid $pid still runs ${STOP_TIMEOUT} s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do proc_alive "$pid" || break; sleep 0.02; done
    fi
    # Reap it when it is our child (run, or a failed start).
    wait "$pid" 2>/dev/null || true
  done
}

# Stops every process listed in DIR/pids: switchboard first (its graceful
# stop still talks to etcd), then etcd.
stop_dir() {
  local dir=$1 name pid
  local first=() last=()
  [[ -f $dir/pids ]] || return 0
  while read -r name pid; do
    [[ -n ${pid:-} ]] || continue
    case $name in
      etcd) last+=("$pid") ;;
      *) first+=("$pid") ;;
    esac
  done <"$dir/pids"
  ((${#first[@]} == 0)) || terminate "$dir" "${first[@]}"
  ((${#last[@]} == 0)) || terminate "$dir" "${last[@]}"
}

# --- start -----------------------------------------------------------------

# fail NAME MESSAGE: a start-up failure. Stops what was started, prints the
# tail of NAME's log, exits 1. The logs stay in DIR.
fail() {
  trap - EXIT INT TERM
  log "$2"
  if [[ -n ${1:-} && -f $DIR/$1.log ]]; then
    log "last lines of $DIR/$1.log:"
    tail -n 30 "$DIR/$1.log" | sed 's/^/    /' >&2
    # A start-up error scrolled out by a backtrace: show it too.
    if ! tail -n 30 "$DIR/$1.log" | grep -q '^Error:' && grep -q '^Error:' "$DIR/$1.log"; then
      log "the error in $DIR/$1.log:"
      grep -A3 '^Error:' "$DIR/$1.log" | sed 's/^/    /' >&2
    fi
  fi
  log "stopping what was started"
  stop_dir "$DIR"
  rm -f "$DIR/pids" "$DIR/.starttimes" "$DIR/env"
  log "logs kept in $DIR"
  exit 1
}

wait_tcp() { # name port
  local deadline=$((SECONDS + 10))
  until (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; do
    proc_alive "${PID[$1]}" || fail "$1" "$1 exited during start-up"
    ((SECONDS < deadline)) || fail "$1" "$1 does not listen on 127.0.0.1:$2 after 10 s"
    sleep 0.05
  done
}

# readyz PORT: sets READY_CODE (000 when there is no answer) and READY_BODY.
readyz() {
  local port=$1 out
  READY_CODE=000
  READY_BODY=""
  if command -v curl >/dev/null 2>&1 && [[ ${RING_SH_NO_CURL:-} != 1 ]]; then
    out=$(curl -s --max-time 3 -w '\n%{http_code}' "http://127.0.0.1:$port/readyz" 2>/dev/null) || true
    [[ -n $out ]] || return 0
    READY_CODE=${out##*$'\n'}
    if [[ $out == *$'\n'* ]]; then READY_BODY=${out%$'\n'*}; fi
  else
    # shellcheck disable=SC2016 # expanded by the inner bash
    out=$(timeout 3 bash -c '
      exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
      printf "GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
      cat <&3' _ "$port" 2>/dev/null) || true
    [[ -n $out ]] || return 0
    local status=${out%%$'\n'*}
    status=${status%$'\r'}
    READY_CODE=$(awk '{print $2}' <<<"$status")
    READY_BODY=${out#*$'\r\n\r\n'}
  fi
}

cmd_start() { # [DIR]
  ensure_services
  resolve_bin
  local created=0
  if [[ -n ${1:-} ]]; then
    DIR=$1
    if [[ -f $DIR/pids ]]; then
      local name pid
      while read -r name pid; do
        if [[ -n ${pid:-} ]] && proc_alive "$pid" && ours "$DIR" "$pid"; then
          die "$DIR already has a running ring ($name is pid $pid): stop it first with $self stop $DIR"
        fi
      done <"$DIR/pids"
    fi
    mkdir -p "$DIR"
  else
    DIR=$(mktemp -d -t switchboard-ring.XXXXXX)
    created=1
  fi
  DIR=$(cd "$DIR" && pwd)
  ((created)) && : >"$DIR/$MARKER"
  rm -f "$DIR/pids" "$DIR/.starttimes" "$DIR/env"
  : >"$DIR/pids"
  : >"$DIR/.starttimes"

  STARTED=()
  declare -gA PID=()
  # Anything unexpected (set -e) or a signal during start: stop what runs.
  trap 'fail "" "start interrupted"' EXIT INT TERM

  local secret=${SWITCHBOARD_FEDERATION_SECRET:-}
  [[ -n $secret ]] || secret=$(random_secret)
  local mesh_secret
  mesh_secret=$(random_secret)

  local ports=()
  mapfile -t ports < <(free_ports $((2 + 3 * ${#NODES[@]})))
  local etcd_port=${ports[0]} etcd_peer_port=${ports[1]}
  local etcd_url="http://127.0.0.1:$etcd_port"

  launch etcd etcd --name switchboard-ring --data-dir "$DIR/etcd" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "switchboard-ring=http://127.0.0.1:$etcd_peer_port" \
    --heartbeat-interval 10 --election-timeout 100
  wait_tcp etcd "$etcd_port"

  local i=2 name
  declare -A MESH=() CLIENT=() FED=()
  for name in "${NODES[@]}"; do
    MESH[$name]=${ports[i]}
    CLIENT[$name]=${ports[i + 1]}
    FED[$name]=${ports[i + 2]}
    i=$((i + 3))
  done

  # The example topology with this run's ports: domain-0N's federation
  # endpoint 127.0.0.1:909N and client URL 127.0.0.1:809N are replaced.
  local sed_args=() n
  for name in "${NODES[@]}"; do
    n=${name: -1}
    sed_args+=(-e "s#127.0.0.1:909$n#127.0.0.1:${FED[$name]}#" -e "s#127.0.0.1:809$n#127.0.0.1:${CLIENT[$name]}#")
  done
  sed "${sed_args[@]}" "$root/deploy/federation/ring.yaml" >"$DIR/ring.yaml"
  "$BIN" topology apply --etcd "$etcd_url" "$DIR/ring.yaml" >"$DIR/topology-apply.log" 2>&1 ||
    { cat "$DIR/topology-apply.log" >&2; fail "" "cannot apply the topology"; }

  for name in "${NODES[@]}"; do
    # Plain logs in the files, start-up errors without a stack trace.
    launch "$name" env NO_COLOR="${NO_COLOR:-1}" RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}" \
      "$BIN" run --domain "$name" --node-id "$name" \
      --etcd "$etcd_url" --mesh-secret "$mesh_secret" \
      --client-addr "127.0.0.1:${CLIENT[$name]}" \
      --mesh-addr "127.0.0.1:${MESH[$name]}" \
      --federation-addr "127.0.0.1:${FED[$name]}" \
      --federation-secret "$secret" \
      --data-dir "$DIR/$name"
  done
  for name in "${NODES[@]}"; do
    wait_tcp "$name" "${CLIENT[$name]}"
  done

  local deadline=$((SECONDS + READY_TIMEOUT)) pending
  declare -A READY=()
  while :; do
    for name in "${STARTED[@]}"; do
      proc_alive "${PID[$name]}" || fail "$name" "$name (pid ${PID[$name]}) exited during start-up"
    done
    pending=""
    for name in "${NODES[@]}"; do
      [[ -n ${READY[$name]:-} ]] && continue
      readyz "${CLIENT[$name]}"
      if [[ $READY_CODE == 200 ]]; then READY[$name]=1; else pending=$name; fi
    done
    [[ -z $pending ]] && break
    if ((SECONDS >= deadline)); then
      fail "$pending" "$pending is not ready after ${READY_TIMEOUT} s: /readyz answered $READY_CODE ${READY_BODY}"
    fi
    sleep 0.2
  done

  (
    umask 077
    {
      printf '# Switchboard federation ring, written by deploy/federation/ring.sh\n'
      printf 'RING_DIR=%q\n' "$DIR"
      printf 'ETCD=%q\n' "$etcd_url"
      for name in "${NODES[@]}"; do
        n=${name: -1}
        printf 'D%s_URL=%q\n' "$n" "ws://127.0.0.1:${CLIENT[$name]}/ws"
        printf 'D%s_ADDR=%q\n' "$n" "127.0.0.1:${CLIENT[$name]}"
      done
      printf 'FEDERATION_SECRET=%q\n' "$secret"
      printf 'SWITCHBOARD_BIN=%q\n' "$BIN"
    } >"$DIR/env"
  )
  trap - EXIT INT TERM

  printf 'Switchboard federation ring running in %s\n' "$DIR"
  printf '  %-10s %-8s %s\n' NAME PID ADDRESSES
  printf '  %-10s %-8s %s\n' etcd "${PID[etcd]}" "$etcd_url"
  for name in "${NODES[@]}"; do
    printf '  %-10s %-8s clients ws://127.0.0.1:%s/ws  federation 127.0.0.1:%s  mesh 127.0.0.1:%s\n' \
      "$name" "${PID[$name]}" "${CLIENT[$name]}" "${FED[$name]}" "${MESH[$name]}"
  done
  printf 'Topology: %s topology show --etcd %s\n' "$BIN" "$etcd_url"
  printf 'Logs: %s/NAME.log   Addresses: %s/env\n' "$DIR" "$DIR"
}

# --- stop ------------------------------------------------------------------

cmd_stop() { # DIR
  local dir=${1:-}
  [[ -n $dir ]] || usage
  [[ -d $dir ]] || die "$dir is not a directory"
  [[ -f $dir/pids ]] || die "$dir/pids not found: not a ring started by $self start"
  dir=$(cd "$dir" && pwd)
  stop_dir "$dir"
  if [[ -f $dir/$MARKER ]]; then
    rm -rf "$dir"
    printf 'Stopped; removed %s\n' "$dir"
  else
    printf 'Stopped; logs are in %s\n' "$dir"
  fi
}

# --- run -------------------------------------------------------------------

cmd_run() {
  cmd_start
  printf 'Press Ctrl-C to stop.\n'
  local dir=$DIR
  # A second Ctrl-C does not cut the stop short (it is bounded anyway).
  trap 'printf "\nStopping...\n"; trap "" INT TERM; cmd_stop "$dir"; exit 0' INT TERM
  local name reported=""
  while :; do
    for name in "${STARTED[@]}"; do
      if [[ $reported != *" $name "* ]] && ! proc_alive "${PID[$name]}"; then
        reported+=" $name "
        log "$name (pid ${PID[$name]}) exited; last lines of $dir/$name.log:"
        tail -n 20 "$dir/$name.log" | sed 's/^/    /' >&2
      fi
    done
    sleep 1 &
    wait $! || true
  done
}

case ${1:-} in
  start) (($# <= 2)) || usage; cmd_start "${2:-}"; printf 'Stop with: %q stop %q\n' "$self" "$DIR" ;;
  stop) (($# == 2)) || usage; cmd_stop "$2" ;;
  run) (($# == 1)) || usage; cmd_run ;;
  *) usage ;;
esac
