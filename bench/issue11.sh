#!/usr/bin/env bash
# Issue 11's performance lines, as an A/B of brokers with one bench binary (BENCHMARKS.md's
# method): writes bench/results/issue11-<timestamp>/ (results.jsonl, run.log, meta.txt,
# ab.md) and prints ab.md.
#
#   bench/issue11.sh [BASE]        BASE: the broker before issue 11 [0f49207]
#
# Builds (release) sluice-bench and the broker of the working tree ("new"), and the broker of
# BASE in a throwaway git worktree ("base"; same target dir, so only the workspace's own
# crates are compiled again). Then, ROUNDS times, each run on a fresh broker with an empty
# data dir (started and stopped by PID by the bench):
#   W1, W2, W3, W4   base vs new, the order alternated each round; base with --ids off (it
#                    has no ids), new with a retention sweep every second ($RETENTION) and an
#                    id on every message (--ids on, the SDK's default)
#   W3 broadcast     new only: 1 group x 4 consumers in broadcast mode vs 4 groups x 1
#                    consumer (the same 4N deliveries), alternated, $BCAST_PAIRS pairs a round
#                    (both sides do the same work, so the per-pair ratio is this machine's
#                    noise around 1: 0.76-1.12 in 12 pairs; its median needs more pairs)
#   W4 + sweep       new only: --sweep-gib $SWEEP_GIB (a second topic filled before the run,
#                    removed by a sweep $SWEEP_AFTER s into it)
# and prints the per-round ratios and their medians (`sluice-bench ab`), judged against:
# W1-W3 new/base >= 0.95, W4 p99 new/base <= 1.05 ("within 5%"), W3 broadcast/4 groups >= 1,
# W4 p99 <= 2 ms in every round whose sweep overlapped the run.
#
# Env knobs:
#   ROUNDS=5  BASE=0f49207  SWEEP_GIB=1  SWEEP_AFTER=3  W4_BOUND_US=2000  BCAST_PAIRS=3
#   RETENTION="--retention-interval 1s --retention-max-age 1h"   (new's broker config)
#   EXTRA=""           extra flags for every run (e.g. "--n 20000" for a quick try)
#   W4_EXTRA=""        extra flags for the W4 runs only, after EXTRA (e.g. "--n 20000")
#   PARTS="ab bcast sweep"   which parts run
#   OUT=bench/results/issue11-<timestamp>
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:-${BASE:-0f49207}}
ROUNDS=${ROUNDS:-5}
SWEEP_GIB=${SWEEP_GIB:-1}
SWEEP_AFTER=${SWEEP_AFTER:-3}
W4_BOUND_US=${W4_BOUND_US:-2000}
BCAST_PAIRS=${BCAST_PAIRS:-3}
RETENTION=${RETENTION:-"--retention-interval 1s --retention-max-age 1h"}
EXTRA=${EXTRA:-}
W4_EXTRA=${W4_EXTRA:-}
PARTS=${PARTS:-"ab bcast sweep"}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$ROOT/bench/results/issue11-$STAMP}

mkdir -p "$OUT"
RES=$OUT/results.jsonl
LOG=$OUT/run.log
: > "$RES"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

cd "$ROOT"
BASE_COMMIT=$(git rev-parse --verify "$BASE^{commit}")

# The base broker: a throwaway worktree of BASE, built into this tree's target dir (the
# dependencies are shared), its binary copied out before the new one is built.
SRC=$(mktemp -d "${TMPDIR:-/tmp}/sluice-issue11-base.XXXXXX")
cleanup() {
  git -C "$ROOT" worktree remove --force "$SRC/tree" >/dev/null 2>&1 || true
  rm -rf "$SRC"
}
trap cleanup EXIT INT TERM
log "building the base broker ${BASE_COMMIT:0:12} in a throwaway worktree"
git worktree add --detach -q "$SRC/tree" "$BASE_COMMIT"
(cd "$SRC/tree" && CARGO_TARGET_DIR=$ROOT/target cargo build --release -q -p sluice --bin sluice)
cp "$ROOT/target/release/sluice" "$OUT/sluice-base"
cleanup
trap - EXIT INT TERM

log "building sluice-bench and the broker of the working tree"
cargo build --release -q -p sluice -p sluice-bench --bin sluice --bin sluice-bench
# Run copies, so that a rebuild in target/ during the run cannot swap the binaries.
cp "$ROOT/target/release/sluice" "$OUT/sluice-new"
cp "$ROOT/target/release/sluice-bench" "$OUT/sluice-bench"
BIN=$OUT/sluice-bench
if cmp -s "$OUT/sluice-base" "$OUT/sluice-new"; then
  log "the base and new brokers are the same binary: is BASE ($BASE) the working tree's code?"
  exit 1
fi

COMMIT=$(git rev-parse HEAD)
DIRTY=$(git status --porcelain -- src sdk bench | awk '{print $2}' | tr '\n' ' ')
NEW="commit ${COMMIT:0:12}${DIRTY:+ with uncommitted changes in: ${DIRTY% }}"
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
{
  echo "date: $(date -u +"%Y-%m-%d %H:%M UTC")"
  echo "base: commit ${BASE_COMMIT:0:12} (git worktree, built apart) -> $OUT/sluice-base"
  echo "new: $NEW -> $OUT/sluice-new"
  echo "machine: $(nproc) cores ($CPU_MODEL), data dirs on $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2{print $2}')"
  echo "rounds: $ROUNDS ($BCAST_PAIRS broadcast pairs each); parts: $PARTS; new's broker: $RETENTION, --ids on; base: --ids off"
  echo "sweep: $SWEEP_GIB GiB, cut $SWEEP_AFTER s into w4; extra: $EXTRA; w4 extra: $W4_EXTRA"
} > "$OUT/meta.txt"
log "results -> $RES"
sed 's/^/  /' "$OUT/meta.txt" | tee -a "$LOG" >&2

run_one() { # label broker round workload [flags...]
  local label=$1 broker=$2 r=$3 w=$4 line=""
  shift 4
  log "round $r $w $label (load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2086
  line=$("$BIN" --peer sluice --workload "$w" --round "$r" --label "$label" --fsync always \
    --sluice-bin "$broker" $EXTRA "$@") || true
  [[ -z $line ]] && line="{\"peer\":\"sluice\",\"workload\":\"$w\",\"label\":\"$label\",\"round\":$r,\"error\":\"no output\"}"
  echo "$line" >> "$RES"
  log "  ${line:0:400}"
  sync
}

w4_flags() { # workload -> its extra flags
  # shellcheck disable=SC2086
  [[ $1 == w4 ]] && echo $W4_EXTRA
  return 0
}

for ((r = 1; r <= ROUNDS; r++)); do
  if [[ " $PARTS " == *" ab "* ]]; then
    for w in w1 w2 w3 w4; do
      # shellcheck disable=SC2046,SC2086
      if ((r % 2)); then
        run_one base "$OUT/sluice-base" "$r" "$w" --ids off $(w4_flags "$w")
        run_one new "$OUT/sluice-new" "$r" "$w" --ids on $RETENTION $(w4_flags "$w")
      else
        run_one new "$OUT/sluice-new" "$r" "$w" --ids on $RETENTION $(w4_flags "$w")
        run_one base "$OUT/sluice-base" "$r" "$w" --ids off $(w4_flags "$w")
      fi
    done
  fi
  if [[ " $PARTS " == *" bcast "* ]]; then
    BCAST="--groups 1 --consumers 4 --mode broadcast"
    GROUPS4="--groups 4 --consumers 1"
    # BCAST_PAIRS pairs per round (numbered apart), the order alternated pair by pair.
    for ((k = 1; k <= BCAST_PAIRS; k++)); do
      p=$(((r - 1) * BCAST_PAIRS + k))
      # shellcheck disable=SC2086
      if ((p % 2)); then
        run_one bcast "$OUT/sluice-new" "$p" w3 --ids on $RETENTION $BCAST
        run_one groups4 "$OUT/sluice-new" "$p" w3 --ids on $RETENTION $GROUPS4
      else
        run_one groups4 "$OUT/sluice-new" "$p" w3 --ids on $RETENTION $GROUPS4
        run_one bcast "$OUT/sluice-new" "$p" w3 --ids on $RETENTION $BCAST
      fi
    done
  fi
  if [[ " $PARTS " == *" sweep "* ]]; then
    # shellcheck disable=SC2086
    run_one sweep "$OUT/sluice-new" "$r" w4 --ids on $RETENTION \
      --sweep-gib "$SWEEP_GIB" --sweep-after "$SWEEP_AFTER" --timeout 600 $W4_EXTRA
  fi
done

"$BIN" ab "$RES" \
  --pair w1:new/base@0.95 --pair w2:new/base@0.95 --pair w3:new/base@0.95 \
  --pair w4:new/base@1.05 --pair w3:bcast/groups4@1 --sweep "sweep@$W4_BOUND_US" > "$OUT/ab.md"
{
  echo "# Issue 11 A/B"
  echo
  sed 's/^/    /' "$OUT/meta.txt"
  cat "$OUT/ab.md"
} > "$OUT/ab.md.tmp" && mv "$OUT/ab.md.tmp" "$OUT/ab.md"
"$BIN" report "$RES" > "$OUT/report.md"
log "ab -> $OUT/ab.md, tables of every run -> $OUT/report.md"
cat "$OUT/ab.md"
