#!/usr/bin/env bash
# What tracing costs, side by side in one run: `switchboard run` with tracing
# off, on with sampling 0.01 and on with sampling 1.0 (spans exported over
# OTLP/gRPC to the otlp_sink example, a counting receiver), under the same
# load: 100 user pairs (200 connections), 1000-character FAST messages,
# rising rates. Nothing else should run meanwhile.
#
#   scripts/bench-tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p switchboard -p switchboard-bench --bins --examples
bin=target/release/switchboard
sink=target/release/examples/otlp_sink
port=18088
sink_port=14317
tmp=$(mktemp -d -t switchboard-bench-tracing.XXXXXX)
pids=()

stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  rm -rf "$tmp"
}
trap cleanup EXIT

"$sink" "127.0.0.1:$sink_port" >"$tmp/sink.log" 2>&1 &
sink_pid=$!
pids+=("$sink_pid")

run_case() { # label, extra run args...
  local label=$1
  shift
  rm -rf "$tmp/data"
  SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 \
    "$bin" run --data-dir "$tmp/data" --client-addr "127.0.0.1:$port" \
    --mesh-addr 127.0.0.1:0 "$@" >"$tmp/server.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  "$bin" bench --url "ws://127.0.0.1:$port/ws" -n 200 --feature "${FEATURE:-fast}" \
    --rate-steps "${STEPS:-100,200,300}" --warmup 2s --duration 5s 2>/dev/null |
    grep '^step' | while IFS= read -r line; do echo "$label: $line"; done
  stop_pid "$server"
}

run_case "tracing off"
run_case "tracing 0.01" --otlp-endpoint "http://127.0.0.1:$sink_port" --trace-sampling 0.01
run_case "tracing 1.0" --otlp-endpoint "http://127.0.0.1:$sink_port" --trace-sampling 1.0
sleep 1
echo "sink: $(tail -1 "$tmp/sink.log")"
