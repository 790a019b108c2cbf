#!/usr/bin/env bash
# The job queue benchmark beside Graphile Worker, in one run on this machine:
#   bench/jobs.sh [sizes]      (default 1000,10000,100000)
# Builds and runs `jobbench` twice (the appliance's queue on a redb file: its internal no-op
# jobs, then a WASM plugin's no-op job queued in bulk and run by the server's plugin runner
# with the default JOBS_PER_PLUGIN_CONFIG of 4), then starts a throwaway PostgreSQL (fsync and
# synchronous_commit on, unix socket only) and runs the same workload on Graphile Worker 0.17.3
# with its performance settings, and prints the tables and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-1000,10000,100000}"

echo "== appliance job queue (redb) =="
cargo build --release --quiet --bin jobbench
appliance_out=$(cargo run --release --quiet --bin jobbench -- --sizes "$sizes")
echo "$appliance_out"
echo "== appliance plugin jobs (WASM) =="
(cd plugins && CARGO_TARGET_DIR=target cargo build --quiet --release --target wasm32-wasip2 -p job-lab)
plugin_out=$(cargo run --release --quiet --bin jobbench -- --plugin --sizes "$sizes")
echo "$plugin_out"

echo "== graphile-worker 0.17.3 on PostgreSQL =="
npm ci --prefix bench/graphile --no-audit --no-fund --silent
pgbin=$(dirname "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")
pgdir=$(mktemp -d /tmp/appliance-graphile-pg.XXXXXX)
owner=$(id -un)
if [ "$(id -u)" = 0 ]; then
  owner=postgres
  chown postgres "$pgdir"
fi
as_owner() { if [ "$owner" = "$(id -un)" ]; then "$@"; else runuser -u "$owner" -- "$@"; fi; }
stop_pg() {
  if [ -f "$pgdir/data/postmaster.pid" ]; then kill "$(head -1 "$pgdir/data/postmaster.pid")" || true; sleep 1; fi
  rm -rf "$pgdir"
}
trap stop_pg EXIT
as_owner "$pgbin/initdb" -D "$pgdir/data" -U postgres --auth=trust >/dev/null
as_owner "$pgbin/pg_ctl" -D "$pgdir/data" -o "-c listen_addresses='' -k $pgdir -c fsync=on -c synchronous_commit=on" -w start >/dev/null
graphile_out=$(node bench/graphile/bench.mjs "postgres://postgres@/postgres?host=$pgdir" "$sizes")
echo "$graphile_out"

echo "== appliance ÷ graphile-worker, enqueue + execute =="
rows() { awk '$1 ~ /^[0-9]+$/' ; }
paste <(echo "$appliance_out" | rows | awk '{print $1, $4}') <(echo "$plugin_out" | rows | awk '{print $4}') \
  <(echo "$graphile_out" | rows | awk '{print $4}') |
  awk '{printf "%9s queued: internal %.1f×, plugin jobs %.1f×\n", $1, $2 / $4, $3 / $4}'
