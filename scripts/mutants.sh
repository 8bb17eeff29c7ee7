#!/usr/bin/env bash
# Mutation testing of the pure policy modules with their unit tests
# (planning, placement, schedule, polling, limits, VHD footer, signing, retry
# classification). Installs cargo-mutants if it is missing. Takes about 85
# minutes on 2 cores: not part of .ci/run. Results: mutants.out/ (or --output).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install --locked cargo-mutants
files=(src/plan.rs src/placement.rs src/engine/schedule.rs src/engine/poll.rs
  src/azure/limits.rs src/vhd.rs src/azure/auth.rs src/azure/retry.rs
  src/storage/mod.rs)
args=()
for f in "${files[@]}"; do args+=(-f "$f"); done
exec cargo mutants "${args[@]}" --cargo-test-arg=--lib -j 1 --timeout 60 "$@"
