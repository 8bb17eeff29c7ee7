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

# A second Azurite over HTTPS with OAuth (--oauth basic) for the Entra ID tests,
# with a local CA and a certificate for 127.0.0.1 made with openssl.
secure_blob=${AZURITE_SECURE_BLOB_PORT:-10100}
secure_queue=${AZURITE_SECURE_QUEUE_PORT:-10101}
certificates() {
  if [ -f "$state/ca.pem" ] && [ -f "$state/tls.pem" ] && [ -f "$state/tls.key" ]; then return 0; fi
  command -v openssl >/dev/null || { echo "openssl is needed for the HTTPS Azurite" >&2; exit 1; }
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vhd-replicator test CA" \
    -keyout "$state/ca.key" -out "$state/ca.pem" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$state/tls.key" -out "$state/tls.csr" >/dev/null 2>&1
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$state/tls.ext"
  openssl x509 -req -in "$state/tls.csr" -CA "$state/ca.pem" -CAkey "$state/ca.key" -CAcreateserial \
    -days 3650 -extfile "$state/tls.ext" -out "$state/tls.pem" >/dev/null 2>&1
}

start_secure() {
  if listening "$secure_blob" && listening "$secure_queue"; then return 0; fi
  certificates
  # NODE_EXTRA_CA_CERTS: Azurite fetches copy sources over HTTPS from itself.
  NODE_EXTRA_CA_CERTS="$state/ca.pem" nohup node_modules/.bin/azurite \
    --blobHost 127.0.0.1 --blobPort "$secure_blob" \
    --queueHost 127.0.0.1 --queuePort "$secure_queue" \
    --tableHost 127.0.0.1 --tablePort "${AZURITE_SECURE_TABLE_PORT:-10102}" \
    --cert "$state/tls.pem" --key "$state/tls.key" --oauth basic \
    --inMemoryPersistence --skipApiVersionCheck --disableProductStyleUrl --disableTelemetry --silent \
    >"$state/azurite-secure.log" 2>&1 &
  echo $! >"$state/azurite-secure.pid"
  for _ in $(seq 1 100); do
    if listening "$secure_blob" && listening "$secure_queue"; then
      echo "HTTPS Azurite (OAuth) is up on 127.0.0.1:$secure_blob/$secure_queue" >&2
      return 0
    fi
    sleep 0.2
  done
  echo "the HTTPS Azurite did not start; see $state/azurite-secure.log" >&2
  exit 1
}

start() {
  if listening "$AZURITE_BLOB_PORT" && listening "$AZURITE_QUEUE_PORT"; then
    echo "Azurite already listening on 127.0.0.1:$AZURITE_BLOB_PORT/$AZURITE_QUEUE_PORT" >&2
    install
    start_secure
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
      start_secure
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
  for f in "$state/azurite-secure.pid"; do
    if [ -f "$f" ]; then
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    fi
  done
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
  status)
    if listening "$AZURITE_BLOB_PORT" && listening "$secure_blob"; then echo "running"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
