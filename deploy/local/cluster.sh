#!/usr/bin/env bash
# Runs a whole distributed Switchboard deployment on loopback, for local use
# and for tests: etcd, Redis and seven switchboard processes
#
#   gw1, gw2          gateway   (client ports: ws://127.0.0.1:PORT/ws)
#   delivery          delivery  (the embedded store; exactly one)
#   groups1, groups2  groups
#   router            router
#   auth              auth
#
# every one on its own free loopback port, sharing one mesh secret.
#
#   cluster.sh start [DIR]   start in DIR (default: a new temp dir), wait until
#                            both gateways answer /readyz with 200, print the
#                            URLs and return; the processes keep running
#   cluster.sh stop DIR      stop what `start` started in DIR (SIGTERM, then
#                            SIGKILL after 15 s); removes DIR if start made it
#   cluster.sh run           start in a temp dir, wait for Ctrl-C or SIGTERM,
#                            stop
#
# DIR holds: pids (`name pid` per line), env (shell-sourceable: ETCD, REDIS,
# GW1_URL, GW2_URL, MESH_SECRET, ...), NAME.log for every process, and each
# process's data dir DIR/NAME.
#
# Environment:
#   SWITCHBOARD_BIN          binary to run; a relative path is taken from the
#                            current directory, else from the repo root
#                            (default: target/release/switchboard,
#                            else target/debug/switchboard, else it is built
#                            with `cargo build --release -p switchboard`)
#   SWITCHBOARD_MESH_SECRET  mesh secret (default: random)
#   SWITCHBOARD_LOG          log filter of the switchboard processes
#   SWITCHBOARD_CONFIG       a config file every switchboard process loads
#                            (e.g. for [[apps]]); flags set by this script win
#   CLUSTER_DELIVERIES=N     N delivery processes (delivery1..N) instead of
#                            one; needs a shared store, e.g.
#                            SWITCHBOARD_STORE__ENGINE=postgres and
#                            SWITCHBOARD_STORE__URL=postgres://…
#   CLUSTER_SH_NO_CURL=1     probe /readyz with bash's /dev/tcp even when curl
#                            is installed (to test that path)
#
# etcd and redis-server are installed with apt-get if missing (Debian's
# etcd-server and redis-server packages; with sudo when not root).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
self=$0

READY_TIMEOUT=30   # seconds for the gateways to become ready
STOP_TIMEOUT=15    # seconds from SIGTERM to SIGKILL
WHAT=cluster
NO_CURL=${CLUSTER_SH_NO_CURL:-}
MARKER=.created-by-cluster-sh

# name:roles, in start order.
NODES=(gw1:gateway gw2:gateway delivery:delivery groups1:groups groups2:groups router:router auth:auth)
# Several delivery processes (a shared store: SWITCHBOARD_STORE__ENGINE and
# SWITCHBOARD_STORE__URL in the environment): delivery1..N.
deliveries=${CLUSTER_DELIVERIES:-1}
[[ $deliveries =~ ^[1-9][0-9]*$ ]] || { printf '[cluster.sh] CLUSTER_DELIVERIES must be a positive number\n' >&2; exit 2; }
if ((deliveries > 1)); then
  NODES=(gw1:gateway gw2:gateway groups1:groups groups2:groups router:router auth:auth)
  for ((d = 1; d <= deliveries; d++)); do NODES+=("delivery$d:delivery"); done
fi

log() { printf '[cluster.sh] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  cat >&2 <<EOF
usage: $self start [DIR]   start a cluster in DIR (default: a new temp dir) and return
       $self stop DIR      stop the cluster started in DIR
       $self run           start in a temp dir, stop on Ctrl-C / SIGTERM
EOF
  exit 2
}

# shellcheck source=../lib/processes.sh
source "$root/deploy/lib/processes.sh"

# --- start -----------------------------------------------------------------

cmd_start() { # [DIR]
  ensure_services etcd:etcd-server redis-server:redis-server
  resolve_bin
  prepare_dir "${1:-}"

  local secret=${SWITCHBOARD_MESH_SECRET:-}
  [[ -n $secret ]] || secret=$(random_secret)

  local ports=()
  mapfile -t ports < <(free_ports $((3 + 2 * ${#NODES[@]})))
  local etcd_port=${ports[0]} etcd_peer_port=${ports[1]} redis_port=${ports[2]}
  local etcd_url="http://127.0.0.1:$etcd_port"
  local redis_url="redis://127.0.0.1:$redis_port"

  launch etcd etcd --name switchboard-local --data-dir "$DIR/etcd" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "switchboard-local=http://127.0.0.1:$etcd_peer_port" \
    --heartbeat-interval 10 --election-timeout 100
  mkdir -p "$DIR/redis"
  launch redis redis-server --port "$redis_port" --bind 127.0.0.1 \
    --save '' --appendonly no --dir "$DIR/redis"
  wait_tcp etcd "$etcd_port"
  wait_tcp redis "$redis_port"

  local i=3 node name roles mesh_port client_port args
  declare -A MESH=() CLIENT=() ROLES=() METRICS=()
  for node in "${NODES[@]}"; do
    name=${node%%:*}
    roles=${node#*:}
    mesh_port=${ports[i]}
    client_port=${ports[i + 1]}
    i=$((i + 2))
    args=(run --roles "$roles" --node-id "$name"
      --mesh-addr "127.0.0.1:$mesh_port"
      --data-dir "$DIR/$name"
      --etcd "$etcd_url" --redis "$redis_url" --mesh-secret "$secret")
    if [[ $roles == *gateway* ]]; then
      args+=(--client-addr "127.0.0.1:$client_port")
      CLIENT[$name]=$client_port
    else
      # No client port: /metrics on its own listener.
      args+=(--metrics-addr "127.0.0.1:$client_port")
      METRICS[$name]=$client_port
    fi
    MESH[$name]=$mesh_port
    ROLES[$name]=$roles
    # Plain logs in the files (tracing colours them unless NO_COLOR is set),
    # and start-up errors without a stack trace (RUST_LIB_BACKTRACE=0 keeps
    # RUST_BACKTRACE for panics).
    launch "$name" env NO_COLOR="${NO_COLOR:-1}" RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}" \
      "$BIN" "${args[@]}"
  done
  for node in "${NODES[@]}"; do
    name=${node%%:*}
    wait_tcp "$name" "${MESH[$name]}"
  done

  # Ready: every process alive, and each gateway's /readyz 200 (store,
  # presence, etcd, and an instance of every other role known).
  local deadline=$((SECONDS + READY_TIMEOUT)) pending gw
  declare -A READY=()
  while :; do
    for name in "${STARTED[@]}"; do
      proc_alive "${PID[$name]}" || fail "$name" "$name (pid ${PID[$name]}) exited during start-up"
    done
    pending=""
    for gw in "${!CLIENT[@]}"; do
      [[ -n ${READY[$gw]:-} ]] && continue
      readyz "${CLIENT[$gw]}"
      if [[ $READY_CODE == 200 ]]; then READY[$gw]=1; else pending=$gw; fi
    done
    [[ -z $pending ]] && break
    if ((SECONDS >= deadline)); then
      fail "$pending" "$pending is not ready after ${READY_TIMEOUT} s: /readyz answered $READY_CODE ${READY_BODY}"
    fi
    sleep 0.2
  done
  for name in "${STARTED[@]}"; do
    proc_alive "${PID[$name]}" || fail "$name" "$name (pid ${PID[$name]}) exited during start-up"
  done

  (
    umask 077
    {
      printf '# Switchboard local cluster, written by deploy/local/cluster.sh\n'
      printf 'CLUSTER_DIR=%q\n' "$DIR"
      printf 'ETCD=%q\n' "$etcd_url"
      printf 'REDIS=%q\n' "$redis_url"
      printf 'GW1_URL=%q\n' "ws://127.0.0.1:${CLIENT[gw1]}/ws"
      printf 'GW2_URL=%q\n' "ws://127.0.0.1:${CLIENT[gw2]}/ws"
      printf 'GW1_ADDR=%q\n' "127.0.0.1:${CLIENT[gw1]}"
      printf 'GW2_ADDR=%q\n' "127.0.0.1:${CLIENT[gw2]}"
      printf 'MESH_SECRET=%q\n' "$secret"
      printf 'SWITCHBOARD_BIN=%q\n' "$BIN"
    } >"$DIR/env"
  )
  trap - EXIT INT TERM

  printf 'Switchboard cluster running in %s\n' "$DIR"
  printf '  %-9s %-9s %-8s %s\n' NAME ROLES PID ADDRESS
  printf '  %-9s %-9s %-8s %s\n' etcd - "${PID[etcd]}" "$etcd_url"
  printf '  %-9s %-9s %-8s %s\n' redis - "${PID[redis]}" "$redis_url"
  for node in "${NODES[@]}"; do
    name=${node%%:*}
    if [[ -n ${CLIENT[$name]:-} ]]; then
      printf '  %-9s %-9s %-8s mesh 127.0.0.1:%s  clients ws://127.0.0.1:%s/ws\n' \
        "$name" "${ROLES[$name]}" "${PID[$name]}" "${MESH[$name]}" "${CLIENT[$name]}"
    else
      printf '  %-9s %-9s %-8s mesh 127.0.0.1:%s  metrics http://127.0.0.1:%s/metrics\n' \
        "$name" "${ROLES[$name]}" "${PID[$name]}" "${MESH[$name]}" "${METRICS[$name]}"
    fi
  done
  printf 'Clients: %s  %s\n' "ws://127.0.0.1:${CLIENT[gw1]}/ws" "ws://127.0.0.1:${CLIENT[gw2]}/ws"
  printf 'Logs: %s/NAME.log   Addresses: %s/env\n' "$DIR" "$DIR"
}

main "$@"
