#!/usr/bin/env bash
# A RocketMQ name server and broker on loopback, for the RocketMQ tests and example
# (rocketmq/tests, rocketmq/examples/rocketmq.rs).
#
#   .ci/rocketmq.sh install        install the pinned name server and broker if missing
#   eval "$(.ci/rocketmq.sh start)" install if missing, start both in a temp directory, wait
#                                  for them, and export STREAM_DEDUP_ROCKETMQ_NAMESRV and
#                                  STREAM_DEDUP_ROCKETMQ_DIR (ports from 9876 and 10911 up,
#                                  the first free ones)
#   .ci/rocketmq.sh stop DIR       stop the servers started in DIR (by their pids), delete DIR
#
# The servers are the Rust implementation's (crates rocketmq-namesrv and rocketmq-broker),
# installed with `cargo install --locked` into STREAM_DEDUP_ROCKETMQ_HOME (default
# /root/.cache/stream-dedup/rocketmq), which later runs on this machine reuse; the first
# install takes about 20 minutes.
set -euo pipefail

VERSION=1.0.0
ROOT="${STREAM_DEDUP_ROCKETMQ_HOME:-/root/.cache/stream-dedup/rocketmq}"
NAMESRV="$ROOT/bin/rocketmq-namesrv-rust"
BROKER="$ROOT/bin/rocketmq-broker-rust"

log() { echo "rocketmq.sh: $*" >&2; }

install() {
  if [ -x "$NAMESRV" ] && [ -x "$BROKER" ]; then
    return
  fi
  log "installing rocketmq-namesrv and rocketmq-broker $VERSION into $ROOT (about 20 minutes)"
  cargo install "rocketmq-namesrv@$VERSION" "rocketmq-broker@$VERSION" --locked --root "$ROOT" >&2
}

# Whether something listens on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The first port from $1 upwards, in steps of 10, where ports $1-2, $1 and $1+1 are all free
# (the broker listens on its port, on its "fast" port two below, and HA one above).
free_ports() {
  local port=$1
  while listening "$port" || listening $((port - 2)) || listening $((port + 1)); do
    port=$((port + 10))
  done
  echo "$port"
}

# Waits up to $2 seconds for 127.0.0.1:$1 to accept connections, while pid $3 lives.
wait_for() {
  local port=$1 seconds=$2 pid=$3 i
  for i in $(seq $((seconds * 10))); do
    listening "$port" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# A log without its colour codes.
plain() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

# Waits up to $2 seconds for the broker log $1 to report the broker ready (registered).
ready() {
  local i
  for i in $(seq $(($2 * 10))); do
    plain "$1" | grep -q 'rocketmq\.broker\.lifecycle.*state="ready"' && return 0
    sleep 0.1
  done
  return 1
}

start() {
  install
  local dir namesrv_port broker_port started
  # In memory where there is a tmpfs: the broker refuses to start, or to store a message, once
  # its store's disk is more than 75% full, and a build machine's disk often is (the store
  # takes ~66 MB).
  local tmp="${TMPDIR:-/tmp}"
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp=/dev/shm; fi
  dir="$(mktemp -d -p "$tmp" stream-dedup-rocketmq.XXXXXX)"
  namesrv_port="$(free_ports "${STREAM_DEDUP_ROCKETMQ_NAMESRV_PORT:-9876}")"
  broker_port="$(free_ports "${STREAM_DEDUP_ROCKETMQ_BROKER_PORT:-10911}")"
  mkdir -p "$dir/home" "$dir/namesrv" "$dir/store"

  cat >"$dir/namesrv.toml" <<EOF
rocketmqHome = "$dir/home"
kvConfigPath = "$dir/namesrv/kvConfig.json"
configStorePath = "$dir/namesrv/namesrv.properties"
EOF

  # A single master on loopback. The mapped files are small (the defaults map 1 GiB of
  # commit log and ~6 MB per consume queue up front): the store takes ~66 MB, not 1.7 GB.
  cat >"$dir/broker.toml" <<EOF
[broker]
namesrvAddr = "127.0.0.1:$namesrv_port"
brokerIp1 = "127.0.0.1"
listenPort = $broker_port
storePathRootDir = "$dir/store"

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "stream-dedup"
brokerClusterName = "StreamDedup"
brokerId = 0

[store]
storeType = "LocalFile"
brokerRole = "ASYNC_MASTER"
storePathRootDir = "$dir/store"
haListenAddress = "127.0.0.1"
haListenPort = $((broker_port + 1))
mappedFileSizeCommitLog = 67108864
mappedFileSizeConsumeQueue = 60000
maxHashSlotNum = 10000
maxIndexNum = 40000
EOF

  started=$(date +%s%N)
  # HOME too: whatever the servers keep under ~ stays in the temp directory.
  ROCKETMQ_HOME="$dir/home" HOME="$dir/home" \
    nohup "$NAMESRV" -c "$dir/namesrv.toml" --listenPort "$namesrv_port" --bindAddress 127.0.0.1 \
    >"$dir/namesrv.log" 2>&1 &
  echo $! >"$dir/namesrv.pid"
  if ! wait_for "$namesrv_port" 30 "$(cat "$dir/namesrv.pid")"; then
    log "the name server did not start; its log:"; plain "$dir/namesrv.log" | tail -20 >&2
    stop "$dir"; return 1
  fi

  ROCKETMQ_HOME="$dir/home" HOME="$dir/home" ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback \
    nohup "$BROKER" -c "$dir/broker.toml" -n "127.0.0.1:$namesrv_port" \
    >"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  if ! wait_for "$broker_port" 60 "$(cat "$dir/broker.pid")"; then
    log "the broker did not start; its log:"; plain "$dir/broker.log" | tail -20 >&2
    stop "$dir"; return 1
  fi
  # Listening comes before the broker has registered with the name server (until then a
  # client finds no route): wait for its "ready" lifecycle event.
  if ! ready "$dir/broker.log" 30; then
    log "the broker did not report ready within 30 s; its log:"; plain "$dir/broker.log" | tail -20 >&2
    stop "$dir"; return 1
  fi
  log "name server 127.0.0.1:$namesrv_port, broker 127.0.0.1:$broker_port, in $dir" \
    "(up in $((($(date +%s%N) - started) / 1000000)) ms)"

  echo "export STREAM_DEDUP_ROCKETMQ_NAMESRV=127.0.0.1:$namesrv_port"
  echo "export STREAM_DEDUP_ROCKETMQ_DIR=$dir"
}

# Stops the servers started in $1, by their pids (TERM, then KILL after 10 s), and deletes it.
stop() {
  local dir=$1 name pid i
  [ -d "$dir" ] || return 0
  # Only a directory that `start` made.
  case "$(basename "$dir")" in stream-dedup-rocketmq.*) ;; *) log "not a server directory: $dir"; return 1 ;; esac
  for name in broker namesrv; do
    [ -f "$dir/$name.pid" ] || continue
    pid="$(cat "$dir/$name.pid")"
    kill "$pid" 2>/dev/null || continue
    for i in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  *) echo "usage: $0 install | start | stop DIR" >&2; exit 2 ;;
esac
