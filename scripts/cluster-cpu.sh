#!/usr/bin/env bash
# CPU per message in each process of the 7-process local cluster
# (deploy/local/cluster.sh) at a fixed rate: 200 connections (100 pairs,
# one end on each gateway) send RATE messages per second in all; the CPU
# each process used (utime + stime from /proc/PID/stat) during MEASURE
# seconds of the run, divided by the messages sent meanwhile.
#
#   scripts/cluster-cpu.sh fast 5000 [BIN...]
#   ROUNDS=3 MEASURE=10 scripts/cluster-cpu.sh reliable 5000 /tmp/before/switchboard target/release/switchboard
#
# BIN defaults to target/release/switchboard (built if missing); several
# binaries run in turn, ROUNDS times (alternating). The generator is always
# GEN (default: the first BIN). Nothing else should run meanwhile: the
# generator, etcd, Redis and the seven processes share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
feature=${1:?usage: $0 fast|reliable RATE [BIN...]}
rate=${2:?usage: $0 fast|reliable RATE [BIN...]}
shift 2
if [[ $# -eq 0 ]]; then
  [[ -x target/release/switchboard ]] || cargo build --release -q -p switchboard
  set -- target/release/switchboard
fi
gen=${GEN:-$1}
measure=${MEASURE:-8}
conns=200
per_conn=$(awk -v r="$rate" -v n="$conns" 'BEGIN { printf "%g", r / n }')
hz=$(getconf CLK_TCK)
cluster_dir=""
tmp=$(mktemp -d -t sb-cluster-cpu.XXXX)
cleanup() {
  [[ -n $cluster_dir ]] && { deploy/local/cluster.sh stop "$cluster_dir" >/dev/null 2>&1 || true; }
  rm -rf "$tmp"
}
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

for _ in $(seq 1 "${ROUNDS:-1}"); do
  for bin in "$@"; do
    cluster_dir="$tmp/cluster"
    SWITCHBOARD_BIN="$bin" SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 \
      deploy/local/cluster.sh start "$cluster_dir" >/dev/null
    # shellcheck disable=SC1091
    source "$cluster_dir/env"
    mapfile -t procs <"$cluster_dir/pids"
    "$gen" bench --url "$GW1_URL" --url "$GW2_URL" -n "$conns" --feature "$feature" \
      --rate-steps "$per_conn" --warmup 3s --duration "$((measure + 4))s" 2>/dev/null \
      | grep '^step' >"$tmp/out" &
    bench_pid=$!
    sleep 5
    declare -A before=()
    for line in "${procs[@]}"; do
      read -r name pid <<<"$line"
      before[$name]=$(ticks "$pid")
    done
    sleep "$measure"
    report="$bin $feature $rate msgs/s, µs CPU per message:"
    total=0
    for line in "${procs[@]}"; do
      read -r name pid <<<"$line"
      used=$(($(ticks "$pid") - ${before[$name]}))
      total=$((total + used))
      report+=" $name $(awk -v t="$used" -v hz="$hz" -v r="$rate" -v s="$measure" 'BEGIN { printf "%.1f", t / hz * 1e6 / (r * s) }')"
    done
    report+=" | all $(awk -v t="$total" -v hz="$hz" -v r="$rate" -v s="$measure" 'BEGIN { printf "%.1f", t / hz * 1e6 / (r * s) }')"
    wait "$bench_pid" || true
    echo "$report"
    sed 's/^/  /' "$tmp/out"
    deploy/local/cluster.sh stop "$cluster_dir" >/dev/null 2>&1 || true
    cluster_dir=""
    unset before
  done
done
