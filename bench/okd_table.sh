#!/usr/bin/env bash
# OKD against offline and on-policy distillation at equal training time
# (docs/RESULTS.md, "OKD (issue 6, item 10)"). The byte-level fortunes
# teacher (examples/lm_teacher.ini) and 2-layer, 128-wide students as in
# examples/lm_kd.ini, threads 1, batch 16, windows of 128, AdamW lr 2e-3
# cosine to 2e-4, seeds 0 1 2:
#   fkl   ce(0.5) + fkl(0.5), 800 steps, teacher frozen       (reused from bench/lm_table.sh)
#   gkd   jsd(beta=0.5), half the batches on-policy, 800 steps (reused from bench/lm_table.sh)
#   rkl   ce(0.5) + rkl(0.5), 800 steps, teacher frozen
#   okd   ce(0.5) + fkl(0.5) against a teacher with LoRA adapters (r=8,
#         alpha=16, all four linears: the [lm] okd_lora default) trained at the same time on
#         ce + fkl with the roles swapped; OKD_STEPS steps
#   lora  LoRA r=8 alpha=16 on all linears of bench/lm_table.sh's CE-only
#         student (base frozen), 200 steps of ce(0.5) + fkl(0.5)
# An OKD step also runs the teacher's backward pass: measured here (40-step
# runs back to back, one thread) it costs 2.0x the CPU time of an fkl step,
# so OKD_STEPS=400 is the equal-time budget of the 800-step rows. Each
# run's CPU seconds (user+sys, /usr/bin/time) are recorded in NAME.time and
# printed beside the table; summary.json has the wall-clock train_seconds.
# Finished runs (summary.json present) are skipped, so the script resumes.
#   bench/okd_table.sh [SEEDS...]   (env: OKD_STEPS=400 JOBS=2 OUT=runs/okd_table LM_TABLE=runs/lm_table)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
OKD_STEPS=${OKD_STEPS:-400}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/okd_table}
LM_TABLE=${LM_TABLE:-runs/lm_table}
D=build/distill
mkdir -p "$OUT"
TEACHER=runs/lm_teacher/teacher.safetensors
[ -f "$TEACHER" ] || OMP_WAIT_POLICY=passive $D run examples/lm_teacher.ini
common="--lm.eval_windows=0 --distill.baseline=0 --threads 1 --quiet --run.out=$OUT"
jobs=()
for seed in $SEEDS; do
    # the 800-step reference rows of bench/lm_table.sh, run here only when that table has none
    [ -f "$LM_TABLE/online_fkl_s$seed/summary.json" ] ||
        jobs+=("fkl_s$seed|--lm.steps=800 --lm.eval_every=800 --distill.loss=ce(weight=0.5)+fkl(weight=0.5) --run.seed=$seed")
    [ -f "$LM_TABLE/online_gkd_s$seed/summary.json" ] ||
        jobs+=("gkd_s$seed|--lm.steps=800 --lm.eval_every=800 --distill.loss=jsd(beta=0.5) --lm.onpolicy=0.5 --lm.prompt=32 --run.seed=$seed")
    jobs+=("rkl_s$seed|--lm.steps=800 --lm.eval_every=800 --distill.loss=ce(weight=0.5)+rkl(weight=0.5) --run.seed=$seed")
    # LoRA (issue 6, item 9): adapters r=8 on all linears of the CE-only
    # student of bench/lm_table.sh (its base frozen), 200 steps of ce + fkl
    [ -f "$LM_TABLE/online_ce_s$seed/student.safetensors" ] &&
        jobs+=("lora_s$seed|--lm.steps=200 --lm.warmup=20 --lm.eval_every=200 --distill.loss=ce(weight=0.5)+fkl(weight=0.5) --lm.lora_base=$LM_TABLE/online_ce_s$seed/student.safetensors --run.seed=$seed")
    jobs+=("okd_s$seed|--lm.steps=$OKD_STEPS --lm.eval_every=$OKD_STEPS --distill.loss=ce(weight=0.5)+fkl(weight=0.5) --lm.okd=1 --lm.okd_loss=ce+fkl --run.seed=$seed")
done
run_one() {
    local name=${1%%|*} args=${1#*|}
    [ -f "$OUT/$name/summary.json" ] && return 0
    local lora=()
    [[ $name == lora_* ]] && lora=(--lm.lora="r=8 alpha=16 targets=all")
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive /usr/bin/time -f "%U %S" -o "$OUT/$name.time" \
        $D run examples/lm_kd.ini --run.name="$name" $common $args "${lora[@]}" > "$OUT/$name.log" 2>&1 ||
        echo "FAILED: $name (see $OUT/$name.log)"
}
export -f run_one
export D OUT common
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
python3 bench/okd_table.py "$OUT" "$LM_TABLE"
