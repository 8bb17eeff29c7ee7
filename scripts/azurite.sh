#!/usr/bin/env bash
# Installs (from npm, pinned in package.json) and starts or stops a local Azurite
# with the accounts of scripts/local-env.sh. Idempotent: `start` reuses a running
# Azurite, `stop` only stops the one this script started.
#   scripts/azurite.sh start | stop | status
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/local-env.sh
source scripts/local-env.sh
state="$root/.azurite"
pidfile="$state/azurite.pid"
mkdir -p "$state"

listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install() {
  if [ ! -x node_modules/.bin/azurite ]; then
    command -v npm >/dev/null || { echo "npm is needed to install Azurite (install Node.js 20)" >&2; exit 1; }
    echo "installing Azurite from npm (pinned in package.json)..." >&2
    if [ -f package-lock.json ]; then
      npm ci --no-audit --no-fund --loglevel=error >&2
    else
      npm install --no-audit --no-fund --loglevel=error >&2
    fi
  fi
}

start() {
  if listening "$AZURITE_BLOB_PORT" && listening "$AZURITE_QUEUE_PORT"; then
    echo "Azurite already listening on 127.0.0.1:$AZURITE_BLOB_PORT/$AZURITE_QUEUE_PORT" >&2
    return 0
  fi
  install
  echo "starting Azurite on 127.0.0.1:$AZURITE_BLOB_PORT (blob) and :$AZURITE_QUEUE_PORT (queue)..." >&2
  # --skipApiVersionCheck: the GA SDK sends a newer service version than Azurite 3.35 knows.
  nohup node_modules/.bin/azurite \
    --blobHost 127.0.0.1 --blobPort "$AZURITE_BLOB_PORT" \
    --queueHost 127.0.0.1 --queuePort "$AZURITE_QUEUE_PORT" \
    --tableHost 127.0.0.1 --tablePort "${AZURITE_TABLE_PORT:-10002}" \
    --inMemoryPersistence --skipApiVersionCheck --disableProductStyleUrl --disableTelemetry --silent \
    >"$state/azurite.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if listening "$AZURITE_BLOB_PORT" && listening "$AZURITE_QUEUE_PORT"; then
      echo "Azurite is up (pid $(cat "$pidfile"))" >&2
      return 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "Azurite exited; its log:" >&2
      cat "$state/azurite.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "Azurite did not start listening within 20 s; see $state/azurite.log" >&2
  exit 1
}

stop() {
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      echo "Azurite stopped" >&2
    fi
    rm -f "$pidfile"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if listening "$AZURITE_BLOB_PORT"; then echo "running"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
