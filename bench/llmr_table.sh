#!/usr/bin/env bash
# LLMR (issue 6, item 11; docs/losses/llmr.md) against plain token-level KD
# on the same budget: the fortunes byte-level GPT teacher and the 2-layer
# student of examples/lm_kd.ini. Per seed:
#   warm   token-level KD (ce(weight=0.5) + fkl(weight=0.5)) for N steps
#   kd     from warm's student, the same KD for M more steps
#   llmr   from warm's student, M LLMR steps (REINFORCE on the student's own
#          samples, reward induced from the teacher's logits)
#   llmr_lowlr  the same at a tenth of the learning rate (sensitivity)
# The two arms share the starting point, the optimiser recipe (AdamW, lr LR
# with W warm-up steps then cosine to LR/10, clip 1) and the number of steps;
# both report the validation loss (nats/byte over the first EVAL_WINDOWS
# validation windows of 128 bytes) and the teacher's NLL of SAMPLES student continuations of
# validation prompts (32 bytes of prompt, 96 sampled at temperature 1).
# Finished runs (summary.json present) are skipped, so the script resumes.
#   bench/llmr_table.sh [SEEDS...]       (default seeds: 0 1 2)
#   env: N=300 M=150 LR=5e-4 W=20 SAMPLES=64 EVAL_WINDOWS=256 JOBS=3 OUT=runs/llmr_table
#        TEACHER=runs/lm_teacher/teacher.safetensors (trained with
#        examples/lm_teacher.ini if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
N=${N:-300}
M=${M:-150}
LR=${LR:-5e-4}
W=${W:-20}
SAMPLES=${SAMPLES:-64}
EVAL_WINDOWS=${EVAL_WINDOWS:-256}
JOBS=${JOBS:-3}
OUT=${OUT:-runs/llmr_table}
TEACHER=${TEACHER:-runs/lm_teacher/teacher.safetensors}
D=build/distill
[ -x $D ] || { echo "$D missing: run make first" >&2; exit 1; }
mkdir -p "$OUT"
[ -f "$TEACHER" ] || OMP_WAIT_POLICY=passive $D run examples/lm_teacher.ini
KD="ce(weight=0.5)+fkl(weight=0.5)"
common="--teacher.checkpoint=$TEACHER --distill.baseline=0 --distill.loss=$KD --lm.eval_windows=$EVAL_WINDOWS --lm.sample_eval=$SAMPLES --train.log_every=25 --threads 1 --quiet --run.out=$OUT"
cont="--lm.steps=$M --lm.eval_every=$M --lm.warmup=$W --train.lr=$LR --train.min_lr=$(python3 -c "print($LR/10)")"
# a sensitivity row: LLMR at a tenth of the learning rate
cont_low="--lm.steps=$M --lm.eval_every=$M --lm.warmup=$W --train.lr=$(python3 -c "print($LR/10)") --train.min_lr=$(python3 -c "print($LR/100)")"
run_one() {
    local name=${1%%|*} args=${1#*|}
    [ -f "$OUT/$name/summary.json" ] && return 0
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive $D run examples/lm_kd.ini --run.name="$name" $common $args > "$OUT/$name.log" 2>&1 ||
        echo "FAILED: $name (see $OUT/$name.log)"
}
export -f run_one
export D OUT common
# one pipeline per seed (warm start, then the two arms from it), JOBS seeds at once
seed_pipeline() {
    local s=$1 init="--lm.init=$OUT/warm_s$1/student.safetensors --run.seed=$1"
    run_one "warm_s$s|--lm.steps=$N --lm.eval_every=$N --run.seed=$s"
    [ -f "$OUT/warm_s$s/student.safetensors" ] || return 0
    run_one "kd_s$s|$cont $init"
    run_one "llmr_s$s|$cont $init --lm.llmr=$M"
    run_one "llmr_lowlr_s$s|$cont_low $init --lm.llmr=$M"
}
export -f seed_pipeline
export N M cont cont_low
printf '%s\n' $SEEDS | xargs -P "$JOBS" -I{} bash -c 'seed_pipeline "$@"' _ {}
python3 - "$OUT" "$N" "$M" "$LR" "$SAMPLES" "$EVAL_WINDOWS" $SEEDS <<'PY'
import json, statistics, sys
out, n, m, lr, samples, ew, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
def stats(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
def get(name):
    rows = []
    for s in seeds:
        summ = json.load(open(f"{out}/{name}_s{s}/summary.json"))["student"]
        se = [json.loads(l) for l in open(f"{out}/{name}_s{s}/metrics.jsonl") if "sample_t_nll" in l][-1]
        rows.append((summ["val_loss"], se["sample_t_nll"], se["sample_s_nll"], summ["train_seconds"]))
    return rows
print(f"Teacher `gpt: layers=4 dim=256 heads=8 ctx=128` -> student `gpt: layers=2 dim=128 heads=4 ctx=128`, "
      f"fortunes bytes, batch 16 x 128; seeds {' '.join(seeds)} (mean ± std). Warm start: {n} KD steps; "
      f"then {m} more steps from it (AdamW lr {lr}). Val loss over the first {ew} validation windows (0: all). Sample NLLs: {samples} continuations of 96 bytes after "
      f"32-byte validation prompts, temperature 1.\n")
print("| student | val loss (nats/byte) | teacher NLL of samples | student NLL of samples | train s (per run) |")
print("|---|---|---|---|---|")
labels = [("warm", f"KD warm start ({n} steps)"), ("kd", f"+ {m} KD steps"), ("llmr", f"+ {m} LLMR steps"),
          ("llmr_lowlr", f"+ {m} LLMR steps at lr {float(lr) / 10:g}")]
for key, label in labels:
    r = get(key)
    cols = [stats([x[i] for x in r]) for i in range(4)]
    print(f"| {label} | {cols[0][0]:.4f} ± {cols[0][1]:.4f} | {cols[1][0]:.3f} ± {cols[1][1]:.3f} | "
          f"{cols[2][0]:.3f} ± {cols[2][1]:.3f} | {cols[3][0]:.0f} |")
PY
