#!/usr/bin/env bash
# A soak: `switchboard soak` (a mixed workload: direct FAST and RELIABLE,
# group messages, users coming and going, slow consumers, offline fetches)
# against a fresh all-in-one node, or against a running deployment.
#
#   scripts/soak.sh 1h                 # fresh release node; a short ramp finds
#                                      # its capacity, the soak runs at half
#   scripts/soak.sh 10m --rate 5000    # extra args go to `switchboard soak`
#   SOAK_URLS="ws://h1:8088/ws ws://h2:8088/ws" SOAK_PIDS="123 456" \
#     scripts/soak.sh 1h               # a running deployment (e.g. deploy/local/cluster.sh)
#
# Prints one line every 10 s (server RSS and open files, messages sent and
# the send rate reached, stored and undelivered — the slow users' share
# apart —, FAST in flight, connects, slow-consumer closes, refusals), then
# the whole report as JSON, which is also kept in target/soak-report.json (or $SOAK_REPORT). Exits
# non-zero when a stored message was lost. Run it with nothing else on
# the machine when its figures are to be quoted. The report's
# `lost_fast_by_cause` says why FAST messages between connected users did
# not arrive (a connection down around the send, refused, unexplained).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:?usage: scripts/soak.sh DURATION [switchboard soak args...]}
shift

cargo build --release -q -p switchboard
bin=target/release/switchboard
tmp=$(mktemp -d -t switchboard-soak.XXXXXX)
server_pid=""
stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap 'stop_server; rm -rf "$tmp"' EXIT

urls=()
pids=()
if [[ -n ${SOAK_URLS:-} ]]; then
  read -ra urls <<<"$SOAK_URLS"
  read -ra pids <<<"${SOAK_PIDS:-}"
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # The soak's steady senders go past the default per-connection rate
  # limit only at high --rate; lift it so refusals are the quotas' alone.
  SWITCHBOARD_LOG=warn SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000 \
    "$bin" run --data-dir "$tmp/data" --client-addr "127.0.0.1:$port" \
    >"$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  urls=("ws://127.0.0.1:$port/ws")
  pids=("$server_pid")
fi

args=(--duration "$duration")
for u in "${urls[@]}"; do args+=(--url "$u"); done
for p in "${pids[@]}"; do args+=(--pid "$p"); done
set +e
"$bin" soak "${args[@]}" "$@" >"$tmp/report.json"
status=$?
set -e
report=${SOAK_REPORT:-target/soak-report.json}
cp "$tmp/report.json" "$report"
cat "$tmp/report.json"
if [[ -n $server_pid ]] && ! kill -0 "$server_pid" 2>/dev/null; then
  echo "the server died during the soak; its log:" >&2
  tail -20 "$tmp/server.log" >&2
  exit 1
fi
exit "$status"
