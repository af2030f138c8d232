#!/usr/bin/env bash
# Federation, measured (docs/federation.md "Measured"): the latency a domain
# hop adds, and how long traffic takes to flow on the other path after the
# domain on the path in use dies. Four domains on this machine
# (deploy/federation/ring.sh); nothing else should run meanwhile: the
# generator, etcd and the four domains share the cores.
#
#   scripts/bench-federation.sh
#
# 1. Latency per hop: the ring with the domain-04 - domain-01 link made
#    expensive (a line 1-2-3-4), so that domain-01 reaches domain-02,
#    domain-03 and domain-04 in 1, 2 and 3 hops; 0 hops is both ends in
#    domain-01. RELIABLE pairs at a moderate rate, one end in each domain.
# 2. Failover: the plain ring, pairs between domain-01 and domain-03 (path
#    via domain-02); after a few seconds domain-02 is killed -9, and the
#    time until domain-01 forwards to domain-04 instead is measured by
#    polling its /metrics.
#
# Environment: CONNS (connections, default 100), RATE (messages per second
# per connection, default 10), DURATION (measured time per case, default 10s).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p switchboard
bin=$PWD/target/release/switchboard
CONNS=${CONNS:-100}
RATE=${RATE:-10}
DURATION=${DURATION:-10s}
tmp=$(mktemp -d -t switchboard-bench-federation.XXXXXX)
ring=""
bench_pid=""
stop_all() {
  [[ -z $bench_pid ]] || { kill "$bench_pid" 2>/dev/null || true; wait "$bench_pid" 2>/dev/null || true; }
  [[ -z $ring ]] || deploy/federation/ring.sh stop "$ring" >/dev/null || true
  ring=""
}
trap 'stop_all; rm -rf "$tmp"' EXIT

start_ring() {
  stop_all
  ring="$tmp/ring"
  rm -rf "$ring"
  SWITCHBOARD_BIN="$bin" SWITCHBOARD_LOG=warn deploy/federation/ring.sh start "$ring" >/dev/null
  # shellcheck disable=SC1091
  source "$ring/env"
}

bench() { # label, bench args...
  local label=$1
  shift
  "$bin" bench --app-id app-id-343 --app-name ANZ -n "$CONNS" --warmup 3s \
    --duration "$DURATION" --feature reliable --rate-steps "$RATE" "$@" 2>/dev/null |
    grep '^step' | while IFS= read -r line; do echo "$label: $line"; done
}

# --- 1. latency per hop ------------------------------------------------------
start_ring
sed 's/{n1: domain-04, n2: domain-01}/{n1: domain-04, n2: domain-01, weight: 100}/' \
  "$ring/ring.yaml" >"$ring/line.yaml"
"$bin" topology apply --etcd "$ETCD" "$ring/line.yaml" >/dev/null
"$bin" topology show --etcd "$ETCD" | grep -E '^  domain-01 -> ' || true
bench "0 hops (domain-01 <-> domain-01)" --url "$D1_URL" --url "$D1_URL" --user-bases 0,0
bench "1 hop  (domain-01 <-> domain-02)" --url "$D1_URL" --url "$D2_URL" --user-bases 0,1000000
bench "2 hops (domain-01 <-> domain-03)" --url "$D1_URL" --url "$D3_URL" --user-bases 0,2000000
bench "3 hops (domain-01 <-> domain-04)" --url "$D1_URL" --url "$D4_URL" --user-bases 0,3000000

# --- 2. failover -------------------------------------------------------------
start_ring
forwarded_to_d4() {
  local text
  text=$(curl -s --max-time 1 "http://$D1_ADDR/metrics" 2>/dev/null) || true
  awk '/^switchboard_federation_forwarded_total\{peer="domain-04"\}/ {print $2; found=1} END {if (!found) print 0}' <<<"$text"
}
"$bin" bench --app-id app-id-343 --app-name ANZ -n "$CONNS" --warmup 1s --duration 20s \
  --feature reliable --rate-steps "$RATE" --url "$D1_URL" --url "$D3_URL" \
  --user-bases 0,2000000 >"$tmp/failover.txt" 2>/dev/null &
bench_pid=$!
sleep 8
before=$(forwarded_to_d4)
d2_pid=$(awk '$1 == "domain-02" {print $2}' "$ring/pids")
killed=$(date +%s%N)
kill -9 "$d2_pid"
moved=""
for _ in $(seq 1 500); do
  now=$(forwarded_to_d4)
  if awk -v a="$now" -v b="$before" 'BEGIN {exit !(a > b)}'; then
    moved=$(( ($(date +%s%N) - killed) / 1000000 ))
    break
  fi
  sleep 0.01
done
wait "$bench_pid" || true
bench_pid=""
echo "failover: domain-02 killed -9; domain-01 forwarded on the other path after ${moved:-(not within 5 s)} ms"
grep '^step' "$tmp/failover.txt" | sed 's/^/failover run (domain-01 <-> domain-03, domain-02 killed at 8 s): /' || true
