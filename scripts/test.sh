#!/usr/bin/env bash
# The whole test suite: checks formatting, lints (clippy, the 100-line rule) and
# documentation, installs and starts Azurite (if it is not running), runs every
# unit, property and integration test, and stops the Azurite it started.
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The conventions first (STYLE.md): formatting, lints with the 100-line rule
# (Cargo.toml [lints] and clippy.toml), documentation without broken links.
# VHDREP_SKIP_LINTS=1 skips them while iterating on one test.
if [ "${VHDREP_SKIP_LINTS:-0}" != 1 ]; then
  echo "== cargo fmt --check" >&2
  cargo fmt --all -- --check
  echo "== cargo clippy --all-targets -D warnings" >&2
  cargo clippy --locked --all-targets -- -D warnings
  echo "== cargo doc (warnings are errors)" >&2
  RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps
fi

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
