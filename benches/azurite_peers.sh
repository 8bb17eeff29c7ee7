#!/usr/bin/env bash
# Side by side on one Azurite: a 256 MiB fixed VHD into 10 replicas over 2
# accounts, by the daemon (fanout and naive), by a Python azure-storage-blob script
# (start_copy_from_url from a SAS source, a thread pool, polling: what an operator
# writes by hand) and by rclone (Debian's, azureblob remotes). Each runs RUNS times
# (default 3); every replica is checked; medians, ratios and the daemon's peak RSS
# are printed. Installs what it needs (rclone from apt, azure-storage-blob from
# PyPI into .bench/venv) and starts Azurite if it is not running.
#   benches/azurite_peers.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/local-env.sh
source scripts/local-env.sh
runs="${RUNS:-3}"
work=.bench
mkdir -p "$work"

if ! command -v rclone >/dev/null; then
  echo "installing rclone (Debian)..." >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq rclone >/dev/null
fi
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
fi
"$work/venv/bin/pip" install -q "azure-storage-blob==12.31.1"
py="$work/venv/bin/python"

started=0
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; fi
  if [ "$started" = 1 ]; then scripts/azurite.sh stop; fi
}
trap cleanup EXIT
if ! scripts/azurite.sh status >/dev/null 2>&1; then scripts/azurite.sh start; started=1; fi

echo "building the daemon (release)..." >&2
cargo build --release --locked --quiet --bin vhd-replicator
bin=target/release/vhd-replicator
config=config/local.toml
source_path="src/bench/source.vhd"
source_url="http://127.0.0.1:10000/$source_path"
"$bin" sample-vhd --config "$config" --url "$source_url" --size-mib 256 --data-mib 256 >&2

now() { date +%s.%N; }
results="$work/results.tsv"
: >"$results"
record() { echo -e "$1\t$2" >>"$results"; echo "  $1 run: $2 s" >&2; }

daemon() {
  local strategy=$1
  VHDREP__ENGINE__STRATEGY=$strategy VHDREP__SERVICE__LISTEN=127.0.0.1:9465 \
    "$bin" run --config "$config" >"$work/daemon-$strategy.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:9465/healthz >/dev/null && break; sleep 0.1; done
  for run in $(seq 1 "$runs"); do
    local id="bench-$strategy-$run-$(date +%s%N)"
    local container="b-$strategy-$run-$(date +%s)"
    cat >"$work/job.json" <<JOB
{"job_id": "$id", "source": "$source_url", "pool": {"id": "bench", "os": "windows", "nodes": 200},
 "accounts": ["dst1", "dst2"], "container": "$container"}
JOB
    local t0 t1
    t0=$(now)
    "$bin" submit --config "$config" --file "$work/job.json" --wait >/dev/null
    t1=$(now)
    record "daemon-$strategy" "$(python3 -c "print(round($t1 - $t0, 3))")"
    "$bin" status --config "$config" "$id" --json |
      "$py" -c 'import json,sys; [print(r["uri"].split("10000/",1)[1]) for r in json.load(sys.stdin)["replicas"]]' >"$work/replicas"
    # shellcheck disable=SC2046
    "$py" benches/peers/check_replicas.py "$source_path" $(cat "$work/replicas") >&2
  done
  echo -e "rss-$strategy\t$(awk '/VmHWM/ {print $2}' /proc/$daemon_pid/status)" >>"$results"
  kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=""
}

echo "== daemon, fanout" >&2; daemon fanout
echo "== daemon, naive" >&2; daemon naive

echo "== Python azure-storage-blob script" >&2
for run in $(seq 1 "$runs"); do
  container="py-$run-$(date +%s)"
  t0=$(now)
  "$py" benches/peers/python_copy.py src bench source.vhd "$container" 10 dst1,dst2 >"$work/replicas"
  t1=$(now)
  record python "$(python3 -c "print(round($t1 - $t0, 3))")"
  # shellcheck disable=SC2046
  "$py" benches/peers/check_replicas.py "$source_path" $(cat "$work/replicas") >&2
done

echo "== rclone $(rclone version | head -1 | awk '{print $2}')" >&2
# rclone 1.60 reaches path-style endpoints through container SAS URLs.
export RCLONE_CONFIG_SRC_TYPE=azureblob
RCLONE_CONFIG_SRC_SAS_URL="$("$py" benches/peers/container_sas.py src bench rl)"
export RCLONE_CONFIG_SRC_SAS_URL
for run in $(seq 1 "$runs"); do
  container="rc-$run-$(date +%s)"
  for a in dst1 dst2; do
    up=$(echo "$a" | tr a-z A-Z)
    export "RCLONE_CONFIG_${up}_TYPE=azureblob"
    export "RCLONE_CONFIG_${up}_SAS_URL=$("$py" benches/peers/container_sas.py "$a" "$container" racwdl)"
  done
  : >"$work/replicas"
  t0=$(now)
  for i in $(seq 0 9); do
    dst=$([ $((i % 2)) = 0 ] && echo dst1 || echo dst2)
    rclone copyto --quiet "src:bench/source.vhd" "$dst:$container/replica-$i.vhd" &
    echo "$dst/$container/replica-$i.vhd" >>"$work/replicas"
  done
  wait
  t1=$(now)
  record rclone "$(python3 -c "print(round($t1 - $t0, 3))")"
  # shellcheck disable=SC2046
  "$py" benches/peers/check_replicas.py "$source_path" $(cat "$work/replicas") >&2
done

"$py" - "$results" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
times, rss = {}, {}
for k, v in rows:
    (rss if k.startswith("rss-") else times).setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in times.items()}
print("| tool | runs (s) | median (s) | vs daemon fanout |")
print("|---|---|---|---|")
for k in ["daemon-fanout", "daemon-naive", "python", "rclone"]:
    if k in med:
        runs = ", ".join(f"{x:.1f}" for x in times[k])
        print(f"| {k} | {runs} | {med[k]:.1f} | {med[k] / med['daemon-fanout']:.1f}x |")
for k, v in rss.items():
    print(f"daemon peak RSS ({k[4:]}): {max(v) / 1024:.1f} MiB")
PY
