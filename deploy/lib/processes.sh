# Shared by deploy/local/cluster.sh and deploy/federation/ring.sh (sourced):
# installing etcd / Redis, finding the switchboard binary, free ports,
# starting processes detached and recording them by PID (with their start
# time, so a reused PID is never signalled), stopping them, readiness
# probes, and the start|stop|run command line.
#
# The sourcing script sets: root (the repo root), self ($0), WHAT (what it
# starts, in messages and temp dir names), MARKER, READY_TIMEOUT,
# STOP_TIMEOUT, NO_CURL (1: probe with bash's /dev/tcp even with curl),
# log, die and usage; and defines cmd_start.

# --- tools -----------------------------------------------------------------

# ensure_services COMMAND:PACKAGE...: installs the Debian packages of the
# commands that are missing.
ensure_services() {
  local need=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || need+=("${spec#*:}")
  done
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
# stop still talks to etcd and Redis), then etcd and Redis (when started).
stop_dir() {
  local dir=$1 name pid
  local first=() last=()
  [[ -f $dir/pids ]] || return 0
  while read -r name pid; do
    [[ -n ${pid:-} ]] || continue
    case $name in
      etcd | redis) last+=("$pid") ;;
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
  if command -v curl >/dev/null 2>&1 && [[ ${NO_CURL:-} != 1 ]]; then
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

# prepare_dir [DIR]: DIR (given, or a new temp dir marked as made here) made
# ready for a start; refuses one whose processes still run. Sets DIR,
# STARTED, PID, and a trap that stops what started if the start fails.
prepare_dir() {
  local created=0
  if [[ -n ${1:-} ]]; then
    DIR=$1
    if [[ -f $DIR/pids ]]; then
      local name pid
      while read -r name pid; do
        if [[ -n ${pid:-} ]] && proc_alive "$pid" && ours "$DIR" "$pid"; then
          die "$DIR already has a running $WHAT ($name is pid $pid): stop it first with $self stop $DIR"
        fi
      done <"$DIR/pids"
    fi
    mkdir -p "$DIR"
  else
    DIR=$(mktemp -d -t "switchboard-$WHAT.XXXXXX")
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
}

# --- stop ------------------------------------------------------------------

cmd_stop() { # DIR
  local dir=${1:-}
  [[ -n $dir ]] || usage
  [[ -d $dir ]] || die "$dir is not a directory"
  [[ -f $dir/pids ]] || die "$dir/pids not found: not a $WHAT started by $self start"
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

# main ARGS: the start|stop|run command line (cmd_start is the script's).
main() {
  case ${1:-} in
    start) (($# <= 2)) || usage; cmd_start "${2:-}"; printf 'Stop with: %q stop %q\n' "$self" "$DIR" ;;
    stop) (($# == 2)) || usage; cmd_stop "$2" ;;
    run) (($# == 1)) || usage; cmd_run ;;
    *) usage ;;
  esac
}
