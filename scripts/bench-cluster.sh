#!/usr/bin/env bash
# All-in-one vs the multi-process cluster, side by side in one run: 100 user
# pairs (200 connections, 1000-character messages), FAST and RELIABLE rate
# ramps against `switchboard run` and against deploy/local/cluster.sh (two
# gateways; each pair has one end on each gateway). Nothing else should run
# meanwhile: the generator, etcd, Redis and every process share the cores.
#
#   scripts/bench-cluster.sh
#   ROUNDS=2 scripts/bench-cluster.sh batching   # the cluster only: [mesh_batch] off, then on, per ramp
#
# Output: one line per measured step, prefixed with the scenario.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p switchboard
bin=target/release/switchboard
port=18088
tmp=$(mktemp -d -t switchboard-bench-cluster.XXXXXX)
server_pid=""
cluster_dir=""
# The generator sends faster than the default per-connection limit.
export SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000
export SWITCHBOARD_LOG=warn

stop_all() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  if [[ -n $cluster_dir ]]; then
    deploy/local/cluster.sh stop "$cluster_dir" >/dev/null || true
    cluster_dir=""
  fi
}
trap 'stop_all; rm -rf "$tmp"' EXIT

start_single() {
  stop_all
  rm -rf "$tmp/data"
  "$bin" run --data-dir "$tmp/data" --client-addr "127.0.0.1:$port" \
    --mesh-addr 127.0.0.1:0 >"$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "switchboard did not listen on $port" >&2
  exit 1
}

start_cluster() { # [batching: true | false]
  stop_all
  cluster_dir="$tmp/cluster"
  SWITCHBOARD_MESH_BATCH__ENABLED=${1:-false} SWITCHBOARD_BIN="$bin" \
    deploy/local/cluster.sh start "$cluster_dir" >/dev/null
  # shellcheck disable=SC1091
  source "$cluster_dir/env"
}

run() { # label, bench args...
  local label=$1
  shift
  "$bin" bench "$@" 2>/dev/null | grep '^step' | while IFS= read -r line; do
    echo "$label: $line"
  done
}

# Per-connection rates (msgs/s); 200 connections, so ×200 in total. The
# cluster's ramps are lower: every process shares the same two cores.
common=(-n 200 --warmup 2s --duration 5s)

if [[ ${1:-} == batching ]]; then
  # The same ramps against the cluster with batched hops off and on,
  # alternating, so that both see the same machine.
  for round in $(seq 1 "${ROUNDS:-1}"); do
    for feature in fast reliable; do
      steps=10,25,50,75,100,150,200
      [[ $feature == reliable ]] && steps=10,25,50,75,100,150
      for batching in false true; do
        start_cluster "$batching"
        run "round $round cluster ${feature^^} batching=$batching" --url "$GW1_URL" --url "$GW2_URL" \
          "${common[@]}" --feature "$feature" --rate-steps "$steps"
      done
    done
  done
  exit 0
fi

start_single
run "all-in-one FAST" --url "ws://127.0.0.1:$port/ws" "${common[@]}" --feature fast --rate-steps 25,50,100,200,400,600
start_cluster
run "cluster FAST" --url "$GW1_URL" --url "$GW2_URL" "${common[@]}" --feature fast --rate-steps 10,25,50,75,100
start_single
run "all-in-one RELIABLE" --url "ws://127.0.0.1:$port/ws" "${common[@]}" --feature reliable --rate-steps 25,50,100,150,200,250
start_cluster
run "cluster RELIABLE" --url "$GW1_URL" --url "$GW2_URL" "${common[@]}" --feature reliable --rate-steps 10,25,50,75,100
