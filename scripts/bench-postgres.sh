#!/usr/bin/env bash
# Cluster RELIABLE throughput on the PostgreSQL store with one, two and
# three delivery processes: deploy/local/cluster.sh (two gateways, two
# groups, router, auth) with CLUSTER_DELIVERIES=N, each run on a fresh
# database of one PostgreSQL started here (Debian's, in a temp dir, as user
# postgres when root; durable settings). 100 user pairs (200 connections,
# 1000-character messages), one end on each gateway. Everything shares the
# machine's cores: read the numbers as overhead and scaling shape.
#
#   scripts/bench-postgres.sh [RATE_STEPS]   (per connection, msgs/s;
#                                             default 10,25,50,75,100)
#
# Output: one line per measured step, prefixed with the delivery count.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=${1:-10,25,50,75,100}
cargo build --release -q -p switchboard
bin=target/release/switchboard
tmp=$(mktemp -d -t switchboard-bench-pg.XXXXXX)
pg_pid=""
cluster_dir=""
export SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND=100000
export SWITCHBOARD_LOG=warn

stop_all() {
  if [[ -n $cluster_dir ]]; then
    deploy/local/cluster.sh stop "$cluster_dir" >/dev/null || true
    cluster_dir=""
  fi
  if [[ -n $pg_pid ]]; then
    kill -INT "$pg_pid" 2>/dev/null || true
    wait "$pg_pid" 2>/dev/null || true
    pg_pid=""
  fi
}
trap 'stop_all; rm -rf "$tmp"' EXIT

pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
as_pg=()
if [[ $(id -u) == 0 ]]; then
  chmod 711 "$tmp"
  mkdir -p "$tmp/pg"
  chown postgres:postgres "$tmp/pg"
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
"${as_pg[@]}" "$pg_bin/initdb" -D "$tmp/pg/data" -A trust -U postgres >"$tmp/initdb.log" 2>&1
"${as_pg[@]}" "$pg_bin/postgres" -D "$tmp/pg/data" -p "$pg_port" -k "$tmp/pg/data" -h 127.0.0.1 \
  -c max_connections=200 -c shared_buffers=256MB >"$tmp/postgres.log" 2>&1 &
pg_pid=$!
for _ in $(seq 1 200); do
  "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
  sleep 0.05
done
server="postgres://postgres@127.0.0.1:$pg_port"

for n in 1 2 3; do
  psql -q "$server/postgres" -c "CREATE DATABASE bench_$n"
  cluster_dir="$tmp/cluster-$n"
  SWITCHBOARD_BIN="$bin" CLUSTER_DELIVERIES=$n SWITCHBOARD_STORE__ENGINE=postgres \
    SWITCHBOARD_STORE__URL="$server/bench_$n" deploy/local/cluster.sh start "$cluster_dir" >/dev/null
  # shellcheck disable=SC1091
  source "$cluster_dir/env"
  "$bin" bench --url "$GW1_URL" --url "$GW2_URL" -n 200 --warmup 2s --duration 5s \
    --feature reliable --rate-steps "$steps" 2>/dev/null | grep '^step' | sed "s/^/$n delivery: /"
  deploy/local/cluster.sh stop "$cluster_dir" >/dev/null
  cluster_dir=""
done
