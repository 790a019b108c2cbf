#!/usr/bin/env bash
# What one single-event capture request costs the appliance, in CPU instructions, counted by
# valgrind's callgrind (repeatable whatever else the machine is doing, unlike a rate):
#   bench/capture-cost.sh [requests]      (default 2000)
# Starts a release build under callgrind on a temporary data directory with the sink held
# back (so only capture, the group commit and their HTTP are counted), sends `requests`
# posthog-js-shaped `$pageview`s to POST /e/ one after another on one keep-alive connection
# (each its own group commit), and prints the instructions per request with the functions that
# take the most of them (inclusive). Needs valgrind (apt-get install valgrind). APPLIANCE_EXE
# measures another build instead of building this tree's; CAPTURE_COST_OUT keeps the profile
# (for callgrind_annotate) at that path.
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-2000}"
command -v valgrind >/dev/null || { echo "capture-cost: valgrind is not installed" >&2; exit 1; }
if [ -z "${APPLIANCE_EXE:-}" ]; then
  cargo build --release --quiet --bin appliance
fi
exe="${APPLIANCE_EXE:-${CARGO_TARGET_DIR:-target}/release/appliance}"
dir=$(mktemp -d /tmp/appliance-capture-cost.XXXXXX)
out="$dir/callgrind.out"
token=phc_captureCostToken0000
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
DATA_DIR="$dir/data" "$exe" team create capture-cost --token "$token" >/dev/null
DATA_DIR="$dir/data" WEB_HOSTNAME=127.0.0.1 WEB_PORT=0 ADMIN_PORT=0 APPLIANCE_ENV_FILE= \
  LOG_LEVEL=warn SINK_LINGER_MS=60000 SINK_BATCH_EVENTS=1048576 SINK_BATCH_BYTES=1073741824 \
  valgrind --tool=callgrind --callgrind-out-file="$out" "$exe" run >"$dir/stdout" 2>"$dir/stderr" &
pid=$!
for _ in $(seq 600); do
  grep -q '^listening on ' "$dir/stdout" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr" >&2; exit 1; }
  sleep 0.5
done
url=$(sed -n 's/^listening on //p' "$dir/stdout" | head -1)
[ -n "$url" ] || { echo "capture-cost: the appliance did not start listening" >&2; exit 1; }
# Warm up (connections, caches, the first commits), then count only the measured requests.
python3 bench/capture_client.py "$url" "$token" 200
callgrind_control --zero "$pid" >/dev/null 2>&1
python3 bench/capture_client.py "$url" "$token" "$requests"
callgrind_control --dump=measured "$pid" >/dev/null 2>&1
sleep 1
measured=$(ls "$out".* | sort | tail -1)
[ -n "${CAPTURE_COST_OUT:-}" ] && cp "$measured" "$CAPTURE_COST_OUT"
total=$(callgrind_annotate "$measured" 2>/dev/null | sed -n 's/^\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
echo "capture cost: $requests single requests on one connection, sink held back"
awk -v t="$total" -v n="$requests" 'BEGIN { printf "%.0f instructions per request (%d in all)\n", t / n, t }'
echo "top functions, inclusive (share of all instructions):"
callgrind_annotate --inclusive=yes --threshold=100 "$measured" 2>/dev/null |
  grep -v -e 'PROGRAM TOTALS' -e 'clone.S:clone' -e 'pthread_create.c:start_thread' -e 'thread_start' -e 'call_once{{vtable.shim}}' |
  awk -v t="$total" '/^ *[0-9,]+ .*\(/ { gsub(",", "", $1); name = $0; sub(/^ *[0-9,]+ +\([ 0-9.%]*\) +/, "", name); sub(/^ *[0-9,]+ +/, "", name); if (++shown <= 40) printf "%6.1f %%  %s\n", 100 * $1 / t, substr(name, 1, 150) }'
