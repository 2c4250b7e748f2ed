#!/usr/bin/env bash
# The language-model results table (docs/RESULTS.md, "Language models"):
# a byte-level GPT teacher on Debian's fortunes, then 2-layer students
# trained for the same number of steps with CE only and with each
# token-level divergence, over seeds. Two regimes:
#   cached  the teacher's top-32 log-probs per position (distill cache),
#           students train on the cached windows; CE baseline on the same windows
#   online  the teacher runs in the graph on random windows; CE baseline,
#           fkl, sequence-level KD (teacher samples), on-policy GKD (jsd)
# Finished runs (summary.json present) are skipped, so the script resumes.
#   bench/lm_table.sh [SEEDS...]      (env: STEPS=800 JOBS=2 OUT=runs/lm_table ONLINE_SEEDS="0 1 2")
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
STEPS=${STEPS:-800}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/lm_table}
D=build/distill
mkdir -p "$OUT"
TEACHER=runs/lm_teacher/teacher.safetensors
[ -f "$TEACHER" ] || OMP_WAIT_POLICY=passive $D run examples/lm_teacher.ini
[ -f "$OUT/teacher_eval.txt" ] || $D eval "$TEACHER" --data text --threads 1 > "$OUT/teacher_eval.txt"
CACHE=$OUT/top32.cache
[ -f "$CACHE" ] || OMP_WAIT_POLICY=passive $D cache "$TEACHER" --data text --topk 32 --out "$CACHE"
common="--lm.steps=$STEPS --lm.eval_every=$STEPS --lm.eval_windows=0 --distill.baseline=0 --threads 1 --quiet --run.out=$OUT"
# cached runs for every seed first (the divergence comparison), then the
# online runs (each also runs the teacher: about 4x a cached run) for
# ONLINE_SEEDS (default: the same seeds)
ONLINE_SEEDS=${ONLINE_SEEDS:-$SEEDS}
jobs=()
for seed in $SEEDS; do
    for m in "ce|ce" "fkl|ce(weight=0.5)+fkl(weight=0.5)" "rkl|ce(weight=0.5)+rkl(weight=0.5)" \
             "jsd|ce(weight=0.5)+jsd(beta=0.5,weight=0.5)" "tvd|ce(weight=0.5)+tvd(weight=0.5)" \
             "skl|ce(weight=0.5)+skl(alpha=0.1,weight=0.5)" "srkl|ce(weight=0.5)+srkl(alpha=0.1,weight=0.5)" \
             "fkl_rlkd|ce(weight=0.5)+fkl(weight=0.5)+rlkd(k=15,weight=0.5)"; do
        name=${m%%|*}; loss=${m#*|}
        jobs+=("cached_${name}_s$seed|--teacher.cache=$CACHE --distill.loss=$loss --run.seed=$seed")
    done
done
for seed in $ONLINE_SEEDS; do
    jobs+=("online_ce_s$seed|--distill.loss=ce --run.seed=$seed")
    jobs+=("online_fkl_s$seed|--distill.loss=ce(weight=0.5)+fkl(weight=0.5) --run.seed=$seed")
    jobs+=("online_seqkd_s$seed|--distill.loss=ce --lm.seqkd=2048 --lm.prompt=16 --lm.temperature=1 --run.seed=$seed")
    jobs+=("online_gkd_s$seed|--distill.loss=jsd(beta=0.5) --lm.onpolicy=0.5 --lm.prompt=32 --run.seed=$seed")
done
run_one() {
    local name=${1%%|*} args=${1#*|}
    [ -f "$OUT/$name/summary.json" ] && return 0
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive $D run examples/lm_kd.ini --run.name="$name" $common $args > "$OUT/$name.log" 2>&1 ||
        echo "FAILED: $name (see $OUT/$name.log)"
}
export -f run_one
export D OUT common
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
python3 bench/lm_table.py "$OUT"
