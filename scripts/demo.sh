#!/usr/bin/env bash
# The main job, locally: starts Azurite (installing it if needed) with a control,
# a source and three destination accounts, uploads a sample fixed VHD, runs the
# daemon with config/local.toml, submits a 200-node Windows pool job, follows it
# to the end, prints the hand-off JSON, and stops everything it started.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/local-env.sh
source scripts/local-env.sh
config=config/local.toml
bin=target/debug/vhd-replicator
mkdir -p .demo

started_azurite=0
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  if [ "$started_azurite" = 1 ]; then scripts/azurite.sh stop; fi
}
trap cleanup EXIT

if ! scripts/azurite.sh status >/dev/null 2>&1; then
  scripts/azurite.sh start
  started_azurite=1
fi

echo "== building vhd-replicator (a first build compiles the Azure SDK crates: about 4-5 minutes on 2 cores; cargo shows each crate as it goes)"
# No --quiet: on a terminal cargo draws its progress bar (crates built / to build),
# elsewhere it prints a line per crate.
cargo build --locked --bin vhd-replicator

echo "== checking the configuration"
"$bin" validate --config "$config" --online

source_url="http://127.0.0.1:10000/src/images/win2016-app.vhd"
echo "== uploading a sample fixed VHD (64 MiB, 8 MiB of data) to $source_url"
"$bin" sample-vhd --config "$config" --url "$source_url" --size-mib 64 --data-mib 8

echo "== starting the daemon (logs in .demo/daemon.log)"
"$bin" run --config "$config" >.demo/daemon.log 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do
  if curl -sf http://127.0.0.1:9464/healthz >/dev/null 2>&1; then break; fi
  if ! kill -0 "$daemon_pid" 2>/dev/null; then cat .demo/daemon.log; exit 1; fi
  sleep 0.1
done

job_id="render-$(date +%Y%m%d-%H%M%S)"
echo "== submitting job $job_id: pool render, 200 Windows nodes"
"$bin" submit --config "$config" --job-id "$job_id" --source "$source_url" \
  --os windows --nodes 200 --pool-id render --vm-size STANDARD_D2_V3 --wait

echo "== replicas"
"$bin" status --config "$config" "$job_id"

echo "== hand-off for the pool-creation stage (.demo/handoff/$job_id.json)"
cat ".demo/handoff/$job_id.json"
echo
