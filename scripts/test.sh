#!/usr/bin/env bash
# Runs the whole Switchboard test suite on a fresh machine.
#
# Installs what is missing (Debian's etcd-server, redis-server, postgresql,
# chromium, npm and systemd, with apt-get; schemathesis from PyPI into a cached venv;
# playwright-core from npm into tests/ui/node_modules), starts etcd, Redis
# and PostgreSQL on free loopback ports with temporary data dirs, passes
# their addresses to the tests (SWITCHBOARD_TEST_ETCD, SWITCHBOARD_TEST_REDIS,
# SWITCHBOARD_TEST_POSTGRES), runs `cargo test --workspace`, and stops what it
# started by PID, also when the tests fail. Arguments go to cargo test in
# place of the default selection (`--workspace --all-targets`), e.g.
# `-p switchboard --test protocol`.
#
# `--no-services` (first argument) starts neither: outside CI the tests that
# need them are skipped, each says why, and the closing line counts them
# (under CI=true they fail). The closing line's "skipped" is cargo's ignored
# tests plus those skips; a skipped test is not counted as passed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

services=1
if [[ ${1:-} == --no-services ]]; then
  services=0
  shift
fi

need=()
if ((services)); then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
fi
# The web UI's browser tests (tests/ui.rs) drive Debian's chromium with
# Node (playwright-core, below).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)
# tests/deploy.rs checks deploy/systemd/switchboard.service with
# `systemd-analyze verify` (the package only installs files in a container).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's packages may start system services on the default ports; ours run
# on their own ports and never touch those.

tmp=$(mktemp -d -t switchboard-test.XXXXXX)
pids=()

stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do
      # kill -0 reports zombies as alive: look at the process state instead.
      [[ -e /proc/$pid ]] || break
      [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
      sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap stop_all EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port name
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  log "$2 did not start on port $1"; exit 1
}

if ((services)); then
  etcd_port=$(free_port)
  etcd_peer_port=$(free_port)
  etcd --name test --data-dir "$tmp/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "test=http://127.0.0.1:$etcd_peer_port" \
    --heartbeat-interval 10 --election-timeout 100 \
    >"$tmp/etcd.log" 2>&1 &
  pids+=($!)

  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp" >"$tmp/redis.log" 2>&1 &
  pids+=($!)

  wait_port "$etcd_port" etcd
  wait_port "$redis_port" redis
  export SWITCHBOARD_TEST_ETCD="http://127.0.0.1:$etcd_port"
  export SWITCHBOARD_TEST_REDIS="redis://127.0.0.1:$redis_port"
  log "etcd at $SWITCHBOARD_TEST_ETCD, redis at $SWITCHBOARD_TEST_REDIS"

  # PostgreSQL (Debian's, newest installed) in a temp data dir, as user
  # postgres when we are root (initdb refuses root): setpriv execs the
  # server, so the PID held is the server's. Tests create their own
  # databases in it.
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  pg_port=$(free_port)
  pg_dir="$tmp/postgres"
  as_pg=()
  if [[ $(id -u) == 0 ]]; then
    chmod 711 "$tmp"
    mkdir -p "$pg_dir"
    chown postgres:postgres "$pg_dir"
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  fi
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres >"$tmp/initdb.log" 2>&1 ||
    { log "initdb failed:"; tail -5 "$tmp/initdb.log" >&2; exit 1; }
  "${as_pg[@]}" "$pg_bin/postgres" -D "$pg_dir/data" -p "$pg_port" -k "$pg_dir/data" -h 127.0.0.1 \
    -c fsync=off -c max_connections=300 >"$tmp/postgres.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 200); do
    "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
    sleep 0.05
  done
  "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" ||
    { log "postgres did not start on port $pg_port"; tail -5 "$tmp/postgres.log" >&2; exit 1; }
  export SWITCHBOARD_TEST_POSTGRES="postgres://postgres@127.0.0.1:$pg_port/postgres"
  log "postgres at $SWITCHBOARD_TEST_POSTGRES"

  # schemathesis (PyPI) fuzzes the REST API from its OpenAPI document
  # (tests/api.rs). Installed once into a venv of its own, pinned, within
  # five minutes; without it that test is skipped (fails under CI=true).
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard-test/venv-schemathesis-4.32.5"
  if [[ ! -x $venv/bin/schemathesis ]]; then
    log "installing schemathesis 4.32.5 into $venv"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" >/dev/null 2>&1 &&
      timeout 300 "$venv/bin/pip" install -q --disable-pip-version-check 'schemathesis==4.32.5' >"$tmp/pip.log" 2>&1; }; then
      log "cannot install schemathesis (python3 venv/pip or PyPI unavailable): its test is skipped"
      tail -3 "$tmp/pip.log" >&2 2>/dev/null || true
      rm -rf "$venv"
    fi
  fi
  if [[ -x $venv/bin/schemathesis ]]; then
    export SWITCHBOARD_TEST_SCHEMATHESIS="$venv/bin/schemathesis"
  else
    unset SWITCHBOARD_TEST_SCHEMATHESIS
  fi
else
  unset SWITCHBOARD_TEST_ETCD SWITCHBOARD_TEST_REDIS SWITCHBOARD_TEST_SCHEMATHESIS SWITCHBOARD_TEST_POSTGRES
  log "no etcd, Redis, PostgreSQL or schemathesis (--no-services): the tests that need them are skipped"
fi
# playwright-core for tests/ui.rs, pinned by tests/ui/package-lock.json:
# `npm ci` into tests/ui/node_modules, again only when the lock changed.
# Without it the browser tests are skipped (fail under CI=true).
ui_lock=tests/ui/node_modules/.switchboard-lock.json
if ! cmp -s tests/ui/package-lock.json "$ui_lock"; then
  log "installing playwright-core (npm ci in tests/ui)"
  if (cd tests/ui && timeout 300 npm ci --no-audit --no-fund --loglevel=error >"$tmp/npm.log" 2>&1); then
    cp tests/ui/package-lock.json "$ui_lock"
  else
    log "cannot install playwright-core: the browser tests are skipped"
    tail -3 "$tmp/npm.log" >&2 || true
  fi
fi
# Each test skipped for a missing service appends a line here.
export SWITCHBOARD_TEST_SKIPS="$tmp/skips"
: >"$SWITCHBOARD_TEST_SKIPS"

export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
set +e
selection=(--workspace --all-targets)
(($#)) && selection=("$@")
cargo test --locked "${selection[@]}" 2>&1 | tee "$tmp/cargo-test.log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
# Skips (deduplicated: one test, one line) are listed, added to cargo's
# ignored tests and taken off its passed ones.
sort -u "$SWITCHBOARD_TEST_SKIPS" -o "$SWITCHBOARD_TEST_SKIPS"
skips=$(wc -l <"$SWITCHBOARD_TEST_SKIPS")
if ((skips)); then
  log "skipped for a missing service:"
  sed 's/^/  /' "$SWITCHBOARD_TEST_SKIPS" >&2
fi
awk -v skips="$skips" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p - skips, f, s + skips }' "$tmp/cargo-test.log"
exit "$status"
