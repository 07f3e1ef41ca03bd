#!/usr/bin/env bash
# Peer brokers for the comparison: Redis 7 Streams and NATS JetStream 2.9 from Debian's
# packages, started on 127.0.0.1 only with their data under $PEER_DATA, stopped by PID.
#
#   bench/peers.sh install                         apt-get the packages if missing
#   bench/peers.sh run SYSTEM -- COMMAND [ARGS...]  start SYSTEM, run COMMAND with
#                                                   SERVER_PID / SERVER_ADDR exported, stop it
#   SYSTEM: redis-everysec | redis-always | nats
#
# Sourced by bench/compare.sh for peer_install / peer_start / peer_stop.
# The packages' own services are never used (in a container they do not start; on a systemd
# host stop them first so they do not add noise). Ports: redis 16379, nats 14222.

PEER_DATA=${PEER_DATA:-/tmp/sluice-bench-peers}
REDIS_PORT=${REDIS_PORT:-16379}
NATS_PORT=${NATS_PORT:-14222}
SERVER_PID=""
SERVER_ADDR=""

peer_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

peer_install() {
  if command -v redis-server >/dev/null && command -v nats-server >/dev/null; then
    return 0
  fi
  peer_log "installing redis-server and nats-server (Debian packages)"
  apt-get update && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends redis-server nats-server
}

peer_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

peer_wait_port() { # port timeout_s
  local i
  for ((i = 0; i < $2 * 100; i++)); do
    peer_port_open "$1" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { peer_log "server died during start"; return 1; }
    sleep 0.01
  done
  peer_log "port $1 not open after $2 s"
  return 1
}

peer_require_free() {
  if peer_port_open "$1"; then
    peer_log "port $1 is already in use, refusing to start"
    return 1
  fi
}

peer_start_redis() { # everysec|always
  local fsync=$1 d=$PEER_DATA/redis
  peer_require_free "$REDIS_PORT" || return 1
  rm -rf "$d"; mkdir -p "$d"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes --daemonize no \
    --dir "$d" --logfile "$d/redis.log" \
    --appendonly yes --appendfsync "$fsync" --save "" --auto-aof-rewrite-percentage 0 \
    >/dev/null 2>&1 &
  SERVER_PID=$!
  SERVER_ADDR=127.0.0.1:$REDIS_PORT
  peer_wait_port "$REDIS_PORT" 20
}

peer_start_nats() {
  local d=$PEER_DATA/nats
  peer_require_free "$NATS_PORT" || return 1
  rm -rf "$d"; mkdir -p "$d"
  cat > "$d/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
server_name: sluice-bench
jetstream {
  store_dir: "$d/js"
  max_memory_store: 1GB
  max_file_store: 20GB
}
EOF
  nats-server -c "$d/nats.conf" -l "$d/nats.log" &
  SERVER_PID=$!
  SERVER_ADDR=127.0.0.1:$NATS_PORT
  peer_wait_port "$NATS_PORT" 20
}

# peer_start SYSTEM: sets SERVER_PID and SERVER_ADDR.
peer_start() {
  case $1 in
    redis-everysec) peer_start_redis everysec ;;
    redis-always) peer_start_redis always ;;
    nats) peer_start_nats ;;
    *) peer_log "unknown system $1"; return 1 ;;
  esac
}

# peer_stop: SIGTERM the server by PID, SIGKILL after 60 s; wipe its data.
peer_stop() {
  local pid=$SERVER_PID i
  SERVER_PID=""; SERVER_ADDR=""
  if [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null; then
    for ((i = 0; i < 600; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      peer_log "pid $pid still alive after 60 s, SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "${PEER_DATA:?}/redis" "${PEER_DATA:?}/nats"
}

peer_versions() {
  echo "redis $(redis-server --version 2>/dev/null | sed -n 's/.*v=\([^ ]*\).*/\1/p'), nats-server $(nats-server --version 2>/dev/null | sed 's/^nats-server: v//')"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    install) peer_install ;;
    run)
      system=${2:?system}; shift 2
      [[ ${1:-} == -- ]] && shift
      peer_install
      trap peer_stop EXIT INT TERM
      peer_start "$system"
      export SERVER_PID SERVER_ADDR
      "$@"
      ;;
    *)
      sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
      exit 2
      ;;
  esac
fi
