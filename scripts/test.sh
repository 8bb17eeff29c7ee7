#!/usr/bin/env bash
# The whole test suite: installs and starts Azurite (if it is not running), runs
# every unit, property and integration test, and stops the Azurite it started.
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

started=0
if ! scripts/azurite.sh status >/dev/null 2>&1; then
  scripts/azurite.sh start
  started=1
fi
cleanup() {
  if [ "$started" = 1 ]; then scripts/azurite.sh stop; fi
}
trap cleanup EXIT

cargo test --locked "$@"
