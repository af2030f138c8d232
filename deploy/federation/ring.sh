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
WHAT=ring
NO_CURL=${RING_SH_NO_CURL:-}
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

# shellcheck source=../lib/processes.sh
source "$root/deploy/lib/processes.sh"

# --- start -----------------------------------------------------------------

cmd_start() { # [DIR]
  ensure_services etcd:etcd-server
  resolve_bin
  prepare_dir "${1:-}"

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

main "$@"
