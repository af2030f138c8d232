#!/usr/bin/env bash
# The side-by-side figures of docs/benchmarks.md from one run on this
# machine: the bare relay, `switchboard run` (all-in-one) FAST and RELIABLE,
# the 7-process cluster (deploy/local/cluster.sh) FAST and RELIABLE, each a
# rate ramp whose maximum at p99 < 50 ms with nothing lost is printed, the
# ratios of the performance targets, the disk's fdatasync bandwidth in the
# store's directory, and the store's bytes written per RELIABLE message and
# MB/s at the all-in-one RELIABLE knee. Nothing else should run meanwhile
# (no build, no other server): the generator and the servers share the
# machine's cores.
#
#   scripts/bench.sh              # the figures above (about 12 minutes)
#   QUICK=1 scripts/bench.sh      # the same, two short steps per ramp (about 3 minutes): checks the script, not the machine
#   scripts/bench.sh ramp         # only the all-in-one ramps, three relay variants
#   scripts/bench.sh connections  # latency by connection count
#   scripts/bench.sh idle         # memory per idle connection (10,000)
#   scripts/bench.sh all          # figures, connections, idle
#
# Output: one line per measured step, prefixed with the scenario, then
# "summary:" lines. It builds the release binaries itself and starts and
# stops every process by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-figures}
quick=${QUICK:-0}

cargo build --release -q -p switchboard -p switchboard-bench --bins --examples
bin=target/release/switchboard
relay=target/release/examples/bare_relay
port=18088
url="ws://127.0.0.1:$port/ws"
tmp=$(mktemp -d -t switchboard-bench.XXXXXX)
server_pid=""
cluster_dir=""

stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  if [[ -n $cluster_dir ]]; then
    deploy/local/cluster.sh stop "$cluster_dir" >/dev/null 2>&1 || true
    cluster_dir=""
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

# label|max msgs/s|its p99: for each ramp, the highest offered rate at which
# that step and every lower one had p99 < 50 ms and lost nothing (0 when
# even the first step did not).
maxima() { # steps file
  sed -nE 's/^(.*): step [0-9]+: ([0-9]+) conns @ ([0-9]+)\/s each: .* lost ([0-9]+) dup [0-9]+, latency ms .* p99 ([0-9.]+) p99\.9 .*/\1|\2|\3|\4|\5/p' "$1" \
    | awk -F'|' '
      !($1 in best) { order[++n] = $1; best[$1] = 0; broken[$1] = 0; p99[$1] = "-"; rate[$1] = 0 }
      {
        if (!broken[$1] && $5 + 0 < 50 && $4 == 0) { best[$1] = $2 * $3; p99[$1] = $5; rate[$1] = $3 } else { broken[$1] = 1 }
      }
      END { for (i = 1; i <= n; i++) printf "%s|%d|%s|%d\n", order[i], best[order[i]], p99[order[i]], rate[order[i]] }'
}

start_cluster() {
  stop_server
  cluster_dir="$tmp/cluster"
  SWITCHBOARD_BIN="$bin" SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 \
    deploy/local/cluster.sh start "$cluster_dir" >/dev/null
  # shellcheck disable=SC1091
  source "$cluster_dir/env"
}

run_urls() { # label, bench args... (URLs included)
  local label=$1; shift
  "$bin" bench "$@" 2>/dev/null | grep '^step' | while IFS= read -r line; do
    echo "$label: $line"
  done | tee -a "$tmp/steps.txt"
}

# The disk's sequential write bandwidth with fdatasync, in the directory the
# store writes to, in MB/s (as dd reports it).
disk_mbps() { # dir, MiB
  mkdir -p "$1"
  local out
  out=$(dd if=/dev/zero of="$1/dd.test" bs=1M count="$2" conv=fdatasync 2>&1 | tail -1)
  rm -f "$1/dd.test"
  echo "$out" >&2
  awk '{ for (i = 1; i < NF; i++) if ($(i + 1) ~ /^[kMG]B\/s$/) {
           v = $i; u = $(i + 1); gsub(",", ".", v)
           if (u == "GB/s") v *= 1000; else if (u == "kB/s") v /= 1000
           printf "%.0f\n", v; exit } }' <<<"$out"
}

# The store's writes during a RELIABLE run at the knee (`rate` per
# connection, 200 connections): bytes written by the process (/proc/PID/io
# write_bytes: the inbox log, the tree, removals) per stored message
# (switchboard_inbox_appended_total), the data dir's growth, and the
# highest write rate over 2 s.
knee() { # per-connection rate, seconds
  start switchboard
  local samples="$tmp/knee.samples"
  : >"$samples"
  (
    while kill -0 "$server_pid" 2>/dev/null; do
      appended=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^switchboard_inbox_appended_total/ { s += $2 } END { print s + 0 }')
      written=$(awk '/^write_bytes/ { print $2 }' "/proc/$server_pid/io" 2>/dev/null || echo 0)
      echo "$(date +%s.%N) $written $appended"
      sleep 0.5
    done
  ) >"$samples" &
  local sampler=$!
  local du_before
  du_before=$(du -sb "$tmp/data" | cut -f1)
  run "all-in-one RELIABLE at the knee" -n 200 --feature reliable --rate-steps "$1" --warmup 2s --duration "${2}s" >/dev/null
  sleep 1
  local du_after
  du_after=$(du -sb "$tmp/data" | cut -f1)
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  stop_server
  awk -v du=$((du_after - du_before)) '
    NF == 3 { t[n] = $1; b[n] = $2; a[n] = $3; n++ }
    END {
      if (n < 2 || a[n - 1] == a[0]) { print "0|0|0|0"; exit }
      best = 0
      for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (t[j] - t[i] >= 2) {
        r = (b[j] - b[i]) / (t[j] - t[i]); if (r > best) best = r; break }
      m = a[n - 1] - a[0]
      printf "%.0f|%.0f|%.1f|%.0f\n", (b[n - 1] - b[0]) / m, du / m, best / 1e6, m
    }' "$samples"
}

figures() {
  local relay_steps fast_steps reliable_steps cluster_fast cluster_reliable dd_mib knee_secs
  local timing
  if [[ $quick == 1 ]]; then
    relay_steps=400,1200 fast_steps=400,1200 reliable_steps=200,500
    cluster_fast=10,50 cluster_reliable=10,25
    timing=(--warmup 1s --duration 2s) dd_mib=256 knee_secs=3
  else
    relay_steps=400,800,1200,1600,2000,2400,2800
    fast_steps=$relay_steps
    reliable_steps=200,400,500,600,700,800,900,1000,1200
    cluster_fast=10,25,50,75,100,150,200,300
    cluster_reliable=10,25,50,75,100,150,200
    timing=(--warmup 2s --duration 5s) dd_mib=2000 knee_secs=8
  fi
  : >"$tmp/steps.txt"
  local mbps
  mbps=$(disk_mbps "$tmp/data" "$dd_mib")
  start relay
  run "relay FAST" -n 200 --feature fast --rate-steps "$relay_steps" "${timing[@]}"
  start switchboard
  run "all-in-one FAST" -n 200 --feature fast --rate-steps "$fast_steps" "${timing[@]}"
  start switchboard
  run "all-in-one RELIABLE" -n 200 --feature reliable --rate-steps "$reliable_steps" "${timing[@]}"
  stop_server
  local knee_rate
  knee_rate=$(maxima "$tmp/steps.txt" | awk -F'|' '$1 == "all-in-one RELIABLE" { print $4 }')
  [[ -n $knee_rate && $knee_rate != 0 ]] || knee_rate=${reliable_steps%%,*}
  local store
  store=$(knee "$knee_rate" "$knee_secs")
  if command -v etcd >/dev/null && command -v redis-server >/dev/null || [[ $(id -u) == 0 ]]; then
    start_cluster
    run_urls "cluster FAST" --url "$GW1_URL" --url "$GW2_URL" -n 200 --feature fast --rate-steps "$cluster_fast" "${timing[@]}"
    start_cluster
    run_urls "cluster RELIABLE" --url "$GW1_URL" --url "$GW2_URL" -n 200 --feature reliable --rate-steps "$cluster_reliable" "${timing[@]}"
    stop_server
  fi
  maxima "$tmp/steps.txt" >"$tmp/maxima.txt"
  while IFS='|' read -r label best p99 _; do
    if [[ $best -gt 0 ]]; then
      echo "summary: $label: $best msgs/s at p99 < 50 ms (p99 $p99 ms), every lower step too, nothing lost"
    else
      echo "summary: $label: no step at p99 < 50 ms with nothing lost"
    fi
  done <"$tmp/maxima.txt"
  IFS='|' read -r per_msg du_per_msg knee_mbs stored <<<"$store"
  echo "summary: disk: $mbps MB/s sequential with fdatasync (dd, ${dd_mib} MiB in the store's directory)"
  echo "summary: store at the RELIABLE knee ($((knee_rate * 200)) msgs/s offered, $stored stored): $per_msg bytes written per message (/proc/PID/io), data dir +$du_per_msg bytes per message, $knee_mbs MB/s at most over 2 s"
  awk -F'|' -v mbps="$mbps" -v per_msg="$per_msg" '
    { best[$1] = $2 }
    function ratio(name, a, b, target) {
      if (a > 0 && b > 0) printf "summary: %s = %.2f (target >= %s): %s\n", name, a / b, target, (a / b >= target ? "met" : "not met")
      else printf "summary: %s: not measured\n", name
    }
    END {
      relay = best["relay FAST"]; fast = best["all-in-one FAST"]; rel = best["all-in-one RELIABLE"]
      cfast = best["cluster FAST"]; crel = best["cluster RELIABLE"]
      ratio("all-in-one FAST / relay", fast, relay, 1.0)
      ratio("cluster FAST / all-in-one FAST", cfast, fast, 0.25)
      ratio("cluster RELIABLE / all-in-one RELIABLE", crel, rel, 0.25)
      ratio("all-in-one RELIABLE / FAST", rel, fast, 0.6)
      if (per_msg > 0 && mbps > 0) {
        allowed = mbps * 1e6 / per_msg
        printf "summary: the disk allows %.0f RELIABLE msgs/s (%s MB/s / %s bytes per message)\n", allowed, mbps, per_msg
        ratio("all-in-one RELIABLE / what the disk allows", rel, allowed, 0.8)
      }
    }' "$tmp/maxima.txt"
}

case $what in
  ramp) ramp ;;
  connections) connections ;;
  idle) idle_memory ;;
  figures) figures ;;
  all) figures; connections; idle_memory ;;
  *) echo "usage: $0 [figures|all|ramp|connections|idle]" >&2; exit 2 ;;
esac
