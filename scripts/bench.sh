#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: the bare relay and `switchboard run` under the
# same generator, one after the other on this machine. Nothing else should run
# meanwhile (no build, no other server): the generator and the server share
# the machine's cores.
#
#   scripts/bench.sh            # everything (about 20 minutes)
#   scripts/bench.sh ramp       # only the max-throughput ramps
#
# Output: one line per measured step, prefixed with the scenario; after the
# ramps, "summary:" lines with each one's maximum at p99 < 50 ms and the
# ratios of the targets (FAST / relay, RELIABLE / FAST).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}

cargo build --release -q -p switchboard -p switchboard-bench --bins --examples
bin=target/release/switchboard
relay=target/release/examples/bare_relay
port=18088
url="ws://127.0.0.1:$port/ws"
tmp=$(mktemp -d -t switchboard-bench.XXXXXX)
server_pid=""

stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap 'stop_server; rm -rf "$tmp"' EXIT

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "server did not listen on $port" >&2; exit 1
}

start() { # relay | switchboard
  stop_server
  case $1 in
    relay) "$relay" "127.0.0.1:$port" >"$tmp/server.log" 2>&1 & ;;
    relay-unbuffered) RELAY_WRITE_BUFFER=0 "$relay" "127.0.0.1:$port" >"$tmp/server.log" 2>&1 & ;;
    relay-no-read-ahead) RELAY_READ_AHEAD=0 "$relay" "127.0.0.1:$port" >"$tmp/server.log" 2>&1 & ;;
    switchboard)
      rm -rf "$tmp/data"
      # The generator sends faster than the default per-connection limit in the ramps.
      SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 \
        "$bin" run --data-dir "$tmp/data" --client-addr "127.0.0.1:$port" \
        --mesh-addr 127.0.0.1:0 >"$tmp/server.log" 2>&1 & ;;
  esac
  server_pid=$!
  wait_port
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$server_pid/status"; }

run() { # label, bench args...
  local label=$1; shift
  "$bin" bench --url "$url" "$@" 2>/dev/null | grep '^step' | while IFS= read -r line; do
    echo "$label: $line"
  done | tee -a "$tmp/steps.txt"
}

# For each ramp: the highest offered rate at which that step and every
# lower one had p99 < 50 ms and lost nothing; then the ratios the targets
# are stated in.
summarize() { # steps file
  sed -nE 's/^(.*): step [0-9]+: ([0-9]+) conns @ ([0-9]+)\/s each: .* lost ([0-9]+) dup [0-9]+, latency ms .* p99 ([0-9.]+) p99\.9 .*/\1|\2|\3|\4|\5/p' "$1" \
    | awk -F'|' '
      !($1 in best) { order[++n] = $1; best[$1] = 0; broken[$1] = 0 }
      {
        if (!broken[$1] && $5 + 0 < 50 && $4 == 0) { best[$1] = $2 * $3; p99[$1] = $5 } else { broken[$1] = 1 }
      }
      END {
        for (i = 1; i <= n; i++) {
          k = order[i]
          if (best[k] > 0) printf "summary: %s: %d msgs/s at p99 < 50 ms (p99 %s ms), every lower step too, nothing lost\n", k, best[k], p99[k]
          else printf "summary: %s: no step at p99 < 50 ms\n", k
        }
        relay = best["relay FAST 200 conns"]; fast = best["switchboard FAST 200 conns"]; rel = best["switchboard RELIABLE 200 conns"]
        if (relay > 0 && fast > 0) printf "summary: switchboard FAST / relay = %d %%\n", 100 * fast / relay
        if (fast > 0 && rel > 0) printf "summary: switchboard RELIABLE / FAST = %d %%\n", 100 * rel / fast
      }'
}

ramp() {
  # Up to 560,000 msgs/s: with its 16 KiB read buffer the generator reaches
  # the relay's ceiling (at 200,000 it was the generator's own, session 4).
  local fast_steps=400,600,800,1000,1200,1400,1600,1800,2000,2400,2800
  : >"$tmp/steps.txt"
  start relay
  run "relay FAST 200 conns" -n 200 --feature fast --rate-steps $fast_steps --warmup 2s --duration 5s
  # The relay as it was measured up to session 5 (reads straight into the
  # codec's 4 KiB buffer).
  start relay-no-read-ahead
  run "relay (no read-ahead) FAST 200 conns" -n 200 --feature fast --rate-steps $fast_steps --warmup 2s --duration 5s
  start relay-unbuffered
  run "relay (one write per frame) FAST 200 conns" -n 200 --feature fast --rate-steps $fast_steps --warmup 2s --duration 5s
  start switchboard
  run "switchboard FAST 200 conns" -n 200 --feature fast --rate-steps $fast_steps --warmup 2s --duration 5s
  start switchboard
  run "switchboard RELIABLE 200 conns" -n 200 --feature reliable --rate-steps 200,400,500,600,700,800,900,1000,1200 --warmup 2s --duration 5s
  stop_server
  summarize "$tmp/steps.txt"
}

connections() {
  for target in relay switchboard; do
    for feature in fast reliable; do
      [[ $target == relay && $feature == reliable ]] && continue
      start "$target"
      run "$target $feature default workload (1000 conns, 100/s, 1000 chars)" -n 1000 --feature "$feature" --warmup 3s --duration 10s
      # The same 20,000 msgs/s spread over more connections.
      for n_rate in 1000:20 2000:10 4000:5 10000:2; do
        start "$target"
        run "$target $feature ${n_rate%%:*} conns @ ${n_rate##*:}/s" -n "${n_rate%%:*}" --rate-steps "${n_rate##*:}" --feature "$feature" --warmup 3s --duration 10s
      done
    done
  done
}

idle_memory() {
  for target in relay switchboard; do
    start "$target"
    local before after
    before=$(rss_kb)
    "$bin" bench --url "$url" -n 10000 --idle --duration 15s 2>/dev/null &
    local gen=$!
    sleep 12
    after=$(rss_kb)
    wait "$gen" || true
    echo "$target idle: RSS ${before} kB empty, ${after} kB with 10000 idle connections: $(( (after - before) / 1024 )) MiB, $(( (after - before) * 1024 / 10000 )) bytes per connection"
  done
}

case $what in
  ramp) ramp ;;
  connections) connections ;;
  idle) idle_memory ;;
  all) ramp; connections; idle_memory ;;
  *) echo "usage: $0 [all|ramp|connections|idle]" >&2; exit 2 ;;
esac
