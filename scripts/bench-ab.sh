#!/usr/bin/env bash
# A/B: the same generator against two `switchboard` binaries, alternating,
# two rounds, 200 connections; for before/after figures measured in one run.
#
#   git worktree add /tmp/sb-before <commit>
#   (cd /tmp/sb-before && CARGO_TARGET_DIR=/tmp/sb-before-target cargo build --release -p switchboard)
#   cargo build --release -p switchboard
#   scripts/bench-ab.sh /tmp/sb-before-target/release/switchboard target/release/switchboard
#
# Rate steps per connection: FAST_STEPS (default 300,400,500) and
# RELIABLE_STEPS (default 50,75,100); `none` skips that feature.
# IDLE=N measures memory instead: RSS of each binary's `switchboard run`
# empty, then with N idle authenticated connections (as
# `scripts/bench.sh idle`), alternating, two rounds.
set -euo pipefail
before=${1:?usage: $0 BEFORE_BIN AFTER_BIN}
after=${2:?usage: $0 BEFORE_BIN AFTER_BIN}
gen=$after
port=18088
run_one() { # label server-binary bench-args...
  local label=$1 server=$2; shift 2
  local dir; dir=$(mktemp -d -t sb-ab.XXXX)
  SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 "$server" run \
    --data-dir "$dir" --client-addr "127.0.0.1:$port" --mesh-addr 127.0.0.1:0 >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  "$gen" bench --url "ws://127.0.0.1:$port/ws" -n 200 --warmup 2s --duration 5s "$@" 2>/dev/null \
    | grep '^step' | while IFS= read -r l; do echo "$label: $l"; done
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
}
idle_one() { # label server-binary connections
  local label=$1 server=$2 n=$3
  local dir; dir=$(mktemp -d -t sb-ab.XXXX)
  SWITCHBOARD_LOG=warn "$server" run --data-dir "$dir" --client-addr "127.0.0.1:$port" \
    --mesh-addr 127.0.0.1:0 >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  sleep 1
  local before after
  before=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  "$gen" bench --url "ws://127.0.0.1:$port/ws" -n "$n" --idle --duration 15s >/dev/null 2>&1 &
  local g=$!
  sleep 12
  after=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  wait "$g" || true
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
  echo "$label idle: RSS ${before} kB empty, ${after} kB with $n idle connections: $(( (after - before) * 1024 / n )) bytes per connection"
}
if [[ -n ${IDLE:-} ]]; then
  for _ in 1 2; do
    idle_one before "$before" "$IDLE"
    idle_one after "$after" "$IDLE"
  done
  exit 0
fi
fast_steps=${FAST_STEPS:-300,400,500}
reliable_steps=${RELIABLE_STEPS:-50,75,100}
for _ in 1 2; do
  if [[ $fast_steps != none ]]; then
    run_one "before FAST" "$before" --feature fast --rate-steps "$fast_steps"
    run_one "after FAST" "$after" --feature fast --rate-steps "$fast_steps"
  fi
  if [[ $reliable_steps != none ]]; then
    run_one "before RELIABLE" "$before" --feature reliable --rate-steps "$reliable_steps"
    run_one "after RELIABLE" "$after" --feature reliable --rate-steps "$reliable_steps"
  fi
done
