#!/usr/bin/env bash
# CPU per message, side by side: each server binary in turn (ROUNDS rounds,
# alternating) under the same fixed load — 200 connections at RATE messages
# per second each — and the CPU its process and its store-writer thread used
# during 5 measured seconds (ticks of 1/100 s, from /proc). At a fixed rate
# below capacity this separates changes of a few percent, which the
# latency ramps on this noisy machine cannot.
#
#   scripts/bench-cpu.sh reliable 300 /tmp/before/switchboard target/release/switchboard
#   ROUNDS=5 scripts/bench-cpu.sh fast 500 BIN_A BIN_B
#
# A "binary" may be a wrapper script that sets SWITCHBOARD_* settings and
# execs the real one (to compare settings of one build).
set -euo pipefail
cd "$(dirname "$0")/.."
feature=${1:?usage: $0 FEATURE RATE_PER_CONN BIN...}
rate=${2:?usage: $0 FEATURE RATE_PER_CONN BIN...}
shift 2
[[ $# -gt 0 ]] || { echo "usage: $0 FEATURE RATE_PER_CONN BIN..." >&2; exit 2; }
gen=${GEN:-target/release/switchboard}
port=18088
server_pid=""
tmp=""
cleanup() {
  [[ -n $server_pid ]] && { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  [[ -n $tmp ]] && rm -rf "$tmp"
}
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
writer_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    [[ $(cat "$t/comm" 2>/dev/null) == store-writer ]] && { ticks "$1/task/${t##*/}"; return; }
  done
  echo 0
}
for _ in $(seq 1 "${ROUNDS:-3}"); do
  for bin in "$@"; do
    tmp=$(mktemp -d -t sb-cpu.XXXX)
    SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 "$bin" run \
      --data-dir "$tmp/data" --client-addr "127.0.0.1:$port" --mesh-addr 127.0.0.1:0 >"$tmp/log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    "$gen" bench --url "ws://127.0.0.1:$port/ws" -n 200 --feature "$feature" --rate-steps "$rate" \
      --warmup 3s --duration 6s 2>/dev/null | grep '^step' >"$tmp/out" &
    bench_pid=$!
    sleep 4
    s1=$(ticks "$server_pid"); w1=$(writer_ticks "$server_pid")
    sleep 5
    s2=$(ticks "$server_pid"); w2=$(writer_ticks "$server_pid")
    wait "$bench_pid" || true
    p99=$(sed -E 's/.* p99 ([0-9.]+) .*/\1/' "$tmp/out")
    echo "$bin: server $((s2 - s1)) ticks, store-writer $((w2 - w1)) ticks in 5 s; p99 ${p99} ms"
    kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
    rm -rf "$tmp"; tmp=""
  done
done
