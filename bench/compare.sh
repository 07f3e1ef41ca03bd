#!/usr/bin/env bash
# Sluice against Redis Streams and NATS JetStream on this machine, then Sluice's own W5-W7;
# writes bench/results/<timestamp>/ and regenerates BENCHMARKS.md.
#
#   bench/compare.sh                 (run from anywhere; as root: it may apt-get the peers)
#
# For every round, for every workload in $WORKLOADS, every system in $SYSTEMS runs once, the
# order rotated each round (A B C D, B C D A, ...), each on a fresh server with an empty data
# dir, one server at a time, each stopped by PID. Then $SOLO (Sluice only), $SOLO_ROUNDS times.
#
# Env knobs:
#   ROUNDS=3  WORKLOADS="w1 w2 w3 w4"  SYSTEMS="sluice redis-everysec redis-always nats"
#   SOLO="w5 w6 w7"  SOLO_ROUNDS=$ROUNDS  W6_N=10000  W7_N=10000000
#   EXTRA=""            extra flags for every W1-W4 run of every system (e.g. "--n 50000")
#   SOLO_EXTRA=""       extra flags for the W5-W7 runs
#   SLUICE_ARGS=""      extra flags for Sluice runs only (e.g. "--server-arg --batch-size=256")
#   SLUICE_REF=""       measure the broker of this git ref (exported and built apart) instead
#                       of the working tree
#   OUT=bench/results/<timestamp>   BENCHMARKS=BENCHMARKS.md ("" = do not write it)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/peers.sh
source "$ROOT/bench/peers.sh"

ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-"w1 w2 w3 w4"}
SYSTEMS=${SYSTEMS:-"sluice redis-everysec redis-always nats"}
SOLO=${SOLO-"w5 w6 w7"}
SOLO_ROUNDS=${SOLO_ROUNDS:-$ROUNDS}
W6_N=${W6_N:-10000}
W7_N=${W7_N:-10000000}
EXTRA=${EXTRA:-}
SOLO_EXTRA=${SOLO_EXTRA:-}
SLUICE_ARGS=${SLUICE_ARGS:-}
SLUICE_REF=${SLUICE_REF:-}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$ROOT/bench/results/$STAMP}
BENCHMARKS=${BENCHMARKS-$ROOT/BENCHMARKS.md}

mkdir -p "$OUT"
RES=$OUT/results.jsonl
LOG=$OUT/run.log
: > "$RES"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

if [[ " $SYSTEMS " == *" redis"* || " $SYSTEMS " == *" nats "* ]]; then
  peer_install >>"$LOG" 2>&1
fi

cd "$ROOT"
log "building sluice-bench (features peers) and the broker"
cargo build --release -q -p sluice-bench --features peers
# Run copies, so that a rebuild in target/ during the run cannot swap the binaries.
cp "$ROOT/target/release/sluice-bench" "$OUT/sluice-bench"
BIN=$OUT/sluice-bench

# Which broker code is measured.
if [[ -n $SLUICE_REF ]]; then
  COMMIT=$(git rev-parse "$SLUICE_REF")
  SRC=$ROOT/target/bench-src/${COMMIT:0:12}
  rm -rf "$SRC"; mkdir -p "$SRC"
  git archive "$COMMIT" | tar -x -C "$SRC"
  (cd "$SRC" && CARGO_TARGET_DIR=$ROOT/target/bench-ref cargo build --release -q -p sluice --bin sluice)
  SLUICE_BIN=$ROOT/target/bench-ref/release/sluice
  MEASURED="commit \`${COMMIT:0:12}\` (exported with git archive, built apart)"
else
  cargo build --release -q -p sluice --bin sluice
  SLUICE_BIN=$ROOT/target/release/sluice
  COMMIT=$(git rev-parse HEAD)
  DIRTY=$(git status --porcelain -- src sdk | awk '{print $2}' | tr '\n' ' ')
  if [[ -n $DIRTY ]]; then
    MEASURED="working tree on commit \`${COMMIT:0:12}\` with uncommitted changes in: ${DIRTY% }"
  else
    MEASURED="commit \`${COMMIT:0:12}\`"
  fi
fi
cp "$SLUICE_BIN" "$OUT/sluice"   # the exact binary measured (git-ignored with results/)
SLUICE_BIN=$OUT/sluice

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
MEM=$(free -m | awk '/Mem:/{printf "%.1f", $2 / 1024}')
MACHINE="$(nproc) cores ($CPU_MODEL), ${MEM} GiB memory, $(uname -sr), data dirs on $(df -T /tmp | awk 'NR==2{print $2}') ($(df -h /tmp | awk 'NR==2{print $1}'))"
DATE=$(date -u +"%Y-%m-%d %H:%M UTC")
VERSIONS=$(peer_versions)
{
  echo "date: $DATE"
  echo "measured: $MEASURED"
  echo "machine: $MACHINE"
  echo "peers: $VERSIONS"
  echo "rounds: $ROUNDS; workloads: $WORKLOADS; systems: $SYSTEMS; solo: $SOLO x $SOLO_ROUNDS"
  echo "extra: $EXTRA; solo extra: $SOLO_EXTRA; sluice args: $SLUICE_ARGS"
} > "$OUT/meta.txt"
log "results -> $RES"
sed 's/^/  /' "$OUT/meta.txt" | tee -a "$LOG" >&2

trap 'peer_stop' EXIT INT TERM

append() { # json line (or an error object when empty)
  local line=$1 system=$2 w=$3 r=$4
  [[ -z $line ]] && line="{\"peer\":\"$system\",\"workload\":\"$w\",\"round\":$r,\"error\":\"no output\"}"
  echo "$line" >> "$RES"
  log "  ${line:0:400}"
}

run_one() { # system workload round [flags...]
  local system=$1 w=$2 r=$3 line=""
  shift 3
  log "round $r $w $system (load $(cut -d' ' -f1 /proc/loadavg))"
  case $system in
    sluice)
      # the bench starts (and stops) its own broker on 127.0.0.1:0 with a temp data dir
      # shellcheck disable=SC2086
      line=$("$BIN" --peer sluice --workload "$w" --round "$r" --fsync always \
        --sluice-bin "$SLUICE_BIN" "$@" $SLUICE_ARGS) || true
      ;;
    redis-everysec | redis-always | nats)
      if ! peer_start "$system" 2>>"$LOG"; then
        append "{\"peer\":\"${system%%-*}\",\"workload\":\"$w\",\"round\":$r,\"error\":\"server start failed\"}" "$system" "$w" "$r"
        peer_stop
        return 0
      fi
      log "  $system pid $SERVER_PID on $SERVER_ADDR, idle $(grep VmRSS "/proc/$SERVER_PID/status" | tr -s ' \t' ' ')"
      # shellcheck disable=SC2086
      line=$("$BIN" --peer "${system%%-*}" --workload "$w" --round "$r" \
        --addr "$SERVER_ADDR" --server-pid "$SERVER_PID" "$@") || true
      peer_stop
      ;;
    *) log "unknown system $system"; return 1 ;;
  esac
  append "$line" "$system" "$w" "$r"
  sync
}

read -r -a systems <<< "$SYSTEMS"
k=${#systems[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for w in $WORKLOADS; do
    for ((i = 0; i < k; i++)); do # rotate the order each round
      # shellcheck disable=SC2086
      run_one "${systems[$(((i + r - 1) % k))]}" "$w" "$r" $EXTRA
    done
  done
done
for ((r = 1; r <= SOLO_ROUNDS; r++)); do
  for w in $SOLO; do
    # shellcheck disable=SC2086
    case $w in
      w6) run_one sluice w6 "$r" --n "$W6_N" $SOLO_EXTRA ;;
      w7) run_one sluice w7 "$r" --n "$W7_N" --timeout 900 $SOLO_EXTRA ;;
      *) run_one sluice "$w" "$r" $SOLO_EXTRA ;;
    esac
  done
done

"$BIN" report "$RES" --targets > "$OUT/report.md"
log "report -> $OUT/report.md"

[[ -z $BENCHMARKS ]] && exit 0

# Hand-written notes between the markers survive regeneration.
NOTES=""
if [[ -f $BENCHMARKS ]]; then
  NOTES=$(awk '/^<!-- notes -->$/{on=1; next} /^<!-- \/notes -->$/{on=0} on' "$BENCHMARKS")
fi
[[ -z $NOTES ]] && NOTES="(none yet)"
REL_OUT=${OUT#"$ROOT"/}
{
  cat <<EOF
# Benchmarks

Generated by \`bench/compare.sh\` on $DATE from \`$REL_OUT/results.jsonl\`
(raw JSON lines, one per run; \`bench/results/\` is git-ignored, so copy a run you want to keep).

* **Broker measured:** $MEASURED.
* **Machine:** $MACHINE. The client (\`sluice-bench\`, tokio with 2 worker threads) shares
  the 2 cores with the broker; both its CPU and the broker's are recorded per run.
* **Peers:** $VERSIONS, from Debian's packages, started by \`bench/peers.sh\` on 127.0.0.1.
* **Method:** $ROUNDS rounds; in every round each workload runs once per system, the order
  rotated each round, each run on a fresh server with an empty data dir, one server at a time,
  stopped by PID. W5–W7 then ran $SOLO_ROUNDS times against Sluice alone. Every figure is a
  median over the rounds; "vs Redis everysec" is the median of the per-round ratios, so slow
  drift of the shared machine cancels out. Spread = ½(max − min)/median.

## Durability of each column

| system | setting | when a publish is confirmed |
|---|---|---|
| Sluice (fsync always) | \`sluice serve --fsync always\` (the default) | after the batch was written to the topic's log and fdatasynced (group commit: one fsync covers every request that arrived meanwhile); an ack after the group's cursor update is fsynced |
| Redis (appendfsync everysec) | \`appendonly yes\`, \`appendfsync everysec\`, \`save ""\`, no AOF rewrite | after the AOF write(2); fsync about once a second in the background |
| Redis (appendfsync always) | as above with \`appendfsync always\` | after the AOF is fsynced (one fsync per event-loop pass, so batched across clients) |
| NATS JetStream (no fsync before ack) | file storage, R1, limits retention, durable pull consumers, explicit acks | after the write to the file store; 2.9 syncs to disk periodically, never before the PubAck |

Only the Sluice and Redis-always columns survive a power loss with every confirmed message.

## Workloads

| | producer | consumers | measured |
|---|---|---|---|
| W1 | 1, 200,000 × 256 B, up to 1,000 publishes in flight, each awaited until confirmed | none | msgs/s first publish → last confirm |
| W2 | as W1 | 1 group × 1 consumer, acking every message | msgs/s first publish → last ack; publish → receive latency |
| W3 | 100,000 × 256 B | 4 groups × 1 consumer, each gets every message | deliveries/s = 4N / (last ack − first publish) |
| W4 | W2 paced at 10,000 msg/s, 100,000 messages | 1 × 1 | latency p50 / p99 / max |
| W5 | 2,000 × 1 MiB, 32 in flight | none | MB/s (10⁶ B/s) |
| W6 | – | $W6_N idle subscribed consumers, one connection each | (broker RSS loaded − idle) / N |
| W7 | fill $W7_N × 256 B (\`publish_batch\` of 1,000), stop the broker | – | \`sluice serve\` spawn → \`listening\` line → first answered \`admin.stats\` |

Payload bytes 0..8 carry the send timestamp and 8..16 the message index, so every delivery is
checked (unique count, duplicates) and timed. Sluice's client: one \`Producer\` with
\`preserve_order: false\`, 8 requests in flight, up to 512 messages per request; consumers with
\`window 64\` and batches of up to 1,000 messages (as the peers read). Redis: \`XADD\` / \`XREADGROUP COUNT 1000\` / one
\`XACK\` per read. NATS: \`js.publish\` + PubAck / pull batches of 1,000 / one \`+ACK\` per message.
Per-run broker CPU is utime+stime from \`/proc/PID/stat\`, peak RSS is \`VmHWM\`.

EOF
  cat "$OUT/report.md"
  cat <<EOF

## Notes

<!-- notes -->
$NOTES
<!-- /notes -->

## Reproduce

\`\`\`sh
bench/compare.sh                                  # everything above (~5 min here); ROUNDS=5 for more
ROUNDS=1 WORKLOADS=w2 SYSTEMS="sluice redis-everysec" SOLO= BENCHMARKS= bench/compare.sh
cargo build --release -p sluice -p sluice-bench   # one run by hand, Sluice only:
target/release/sluice-bench --workload w2 --n 50000
target/release/sluice-bench report bench/results/*/results.jsonl --targets
\`\`\`
EOF
} > "$BENCHMARKS"
log "wrote $BENCHMARKS"
