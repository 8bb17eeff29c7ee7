#!/usr/bin/env bash
# The whole test suite: installs and starts Azurite (if it is not running), runs
# every unit, property and integration test, and stops the Azurite it started.
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/tools.sh
started=0
if ! scripts/azurite.sh status >/dev/null 2>&1; then
  scripts/azurite.sh start
  started=1
fi
log="$(mktemp)"
cleanup() {
  rm -f "$log"
  if [ "$started" = 1 ]; then scripts/azurite.sh stop; fi
}
trap cleanup EXIT

# The status-page tests keep their Chromium screenshots here for people to open.
export VHDREP_SCREENSHOT_DIR="${VHDREP_SCREENSHOT_DIR:-$root/target/screenshots}"

set +e
cargo test --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$started" = 1 ]; then scripts/azurite.sh stop; started=0; fi
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "Total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
