#!/usr/bin/env bash
# make gpu-check: everything a GPU machine must prove, in one go, under 8 minutes on an H100-class card.
#   1. the rest of the test suite (`-m "not cuda"`, CPU only) starts in the background, 8 threads;
#   2. the `cuda` tests;   3. a small `make all` on CUDA (~500 images, ViT-B/16, 1 epoch, eval);
#   4. once the suite is done (or cut at its limit): `make bench --device cuda`, alone on the machine (this GPU
#      kind's rows in docs/benchmarks.json and BENCHMARKS.md).
# Every step runs under its own time limit; a failing step is reported in the summary and the next one runs.
# The small `make all` runs in a temporary folder (its data/ and cache/ live there), never in the user's.
# Usage: scripts/gpu_check.sh [--dry-run]   (GPU_CHECK_BUDGET_S=480 total, GPU_CHECK_KEEP=1 keeps the folder)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cappa-gpu-check.XXXXXX")"
NPROC="$(nproc 2>/dev/null || echo 4)"
START=$SECONDS
declare -a NAMES=()

cleanup() { [[ "${GPU_CHECK_KEEP:-0}" == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT

left() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME LIMIT DIR COMMAND...: COMMAND in DIR, at most LIMIT seconds; its log and one result line
# (status, seconds, pytest's last count line) land in $WORK/NAME.log and $WORK/NAME.result.
run_step() {
  local name="$1" limit="$2" dir="$3"; shift 3
  local t0=$SECONDS rc took tail
  (cd "$dir" && timeout --kill-after=10 "$limit" "$@") > "$WORK/$name.log" 2>&1
  rc=$?
  took=$(( SECONDS - t0 ))
  tail="$(grep -E '^=* ?[0-9]+ (passed|failed|error)' "$WORK/$name.log" | tail -1)"
  case $rc in
    0) echo "ok in ${took}s ${tail}" ;;
    124|137) echo "TIMED OUT after ${took}s (limit ${limit}s) ${tail}" ;;
    *) echo "FAILED (exit $rc) after ${took}s ${tail}; last line: $(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | cut -c1-160)" ;;
  esac > "$WORK/$name.result"
}

# step NAME CAP_S DIR COMMAND...: run in the foreground, capped by what is left of the budget.
step() {
  local name="$1" cap="$2" dir="$3"; shift 3
  local limit; limit=$(left)
  (( cap < limit )) && limit=$cap
  NAMES+=("$name")
  if (( DRY )); then
    printf '[plan] %-10s <= %4ss  (cd %s && %s)\n' "$name" "$cap" "$dir" "$*"; return
  fi
  if (( limit < 10 )); then echo "skipped: the ${BUDGET}s budget was spent" > "$WORK/$name.result"; return; fi
  echo "=== gpu-check: $name (limit ${limit}s; log $WORK/$name.log) ==="
  run_step "$name" "$limit" "$dir" "$@"
  cat "$WORK/$name.result"
}

if (( ! DRY )); then
  if [[ ! -x "$PY" ]]; then echo "error: $PY missing: run \`make install\` first" >&2; exit 2; fi
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: PyTorch sees no CUDA GPU here: gpu-check needs one" >&2; exit 2
  fi
  "$PY" -c 'import torch; print("gpu-check on", torch.cuda.get_device_name(0), "torch", torch.__version__)'
fi
# Run from $WORK: every default relative path (data/shards, data/synthetic, cache/...) lands there, and the
# Makefile is the repo's own (its venv is already installed: the stamp is newer than pyproject.toml).
ln -s "$REPO/pyproject.toml" "$WORK/pyproject.toml"
ln -s "$REPO/Makefile" "$WORK/Makefile"
MAKE_ALL=(make --no-print-directory VENV="$REPO/.venv" all
  FETCH_ARGS="--count 500 --processes 4 --threads 32"
  ENCODE_ARGS="--device cuda --workers $NPROC --batch-size 64"
  TRAIN_ARGS="--device cuda --epochs 1"
  EVAL_ARGS="--device cuda")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)

BENCH_S=120
SUITE_S=$(( BUDGET - BENCH_S - 15 ))
NAMES+=("test-suite")
if (( DRY )); then
  printf '[plan] %-10s <= %4ss  (background, cd %s && OMP_NUM_THREADS=8 %s)\n' test-suite "$SUITE_S" "$REPO" "${PYTEST[*]} -m 'not cuda' tests"
else
  echo "=== gpu-check: test-suite in the background (limit ${SUITE_S}s; log $WORK/test-suite.log) ==="
  OMP_NUM_THREADS=8 run_step test-suite "$SUITE_S" "$REPO" "${PYTEST[@]}" -m "not cuda" tests &
  SUITE_PID=$!
fi
step cuda-tests 120 "$REPO" "${PYTEST[@]}" -m cuda tests
step make-all 150 "$WORK" "${MAKE_ALL[@]}"
if (( ! DRY )); then wait "$SUITE_PID"; cat "$WORK/test-suite.result"; fi
step bench "$BENCH_S" "$WORK" "$PY" -m pipeline bench --device cuda --json "$REPO/docs/benchmarks.json" \
  --markdown "$REPO/docs/BENCHMARKS.md"

(( DRY )) && { echo "[plan] total budget ${BUDGET}s; work folder $WORK (removed at the end)"; exit 0; }
echo
echo "=== gpu-check summary ($("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'), $(date -I), $(( SECONDS - START ))s) ==="
fail=0
for name in "${NAMES[@]}"; do
  res="$(cat "$WORK/$name.result" 2>/dev/null || echo "no result")"
  printf '  %-11s %s\n' "$name" "$res"
  [[ "$res" == ok* ]] || fail=1
done
report="$(ls "$WORK"/cache/runs/default/eval/report.md 2>/dev/null)"
[[ -n "$report" ]] && grep -m3 -E 'CIDEr|val loss' "$report" | sed 's/^/  eval: /'
exit $fail
