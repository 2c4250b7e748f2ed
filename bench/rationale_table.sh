#!/usr/bin/env bash
# The rationale results table (docs/RESULTS.md, "Issue 6, item 12"):
# a byte-level GPT classifier teacher on five Debian fortune files, trained
# once, then 1-layer students trained for the same number of steps with
#   ce        cross-entropy only
#   kd        CE + KD on the label logits
#   kd_rat    CE + KD + the rationale tagging loss (teacher's top-k saliency tokens)
#   rat       CE + the rationale tagging loss
# over seeds. Finished runs (summary.json present) are skipped, so the
# script resumes.  bench/rationale_table.sh [SEEDS...]
#   (env: STEPS=1000 TEACHER_STEPS=1000 JOBS=2 OUT=runs/rationale_table)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
STEPS=${STEPS:-1000}
TEACHER_STEPS=${TEACHER_STEPS:-1000}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/rationale_table}
D=build/distill
mkdir -p "$OUT"
TEACHER=$OUT/teacher.safetensors
common="--threads 1 --quiet --run.out=$OUT --distill.baseline=0 --textcls.steps=$STEPS --teacher.checkpoint=$TEACHER"
if [ ! -f "$OUT/teacher/summary.json" ]; then
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive $D run examples/rationale.ini --run.name=teacher $common --student.model= \
        --textcls.teacher_steps="$TEACHER_STEPS" > "$OUT/teacher.log" 2>&1
fi
KD="ce(weight=0.5)+kd(T=2,weight=0.5)"
jobs=()
for seed in $SEEDS; do
    jobs+=("ce_s$seed|--distill.loss=ce --textcls.rationale=0 --run.seed=$seed")
    jobs+=("kd_s$seed|--distill.loss=$KD --textcls.rationale=0 --run.seed=$seed")
    jobs+=("kd_rat_s$seed|--distill.loss=$KD --textcls.rationale=1 --run.seed=$seed")
    jobs+=("rat_s$seed|--distill.loss=ce --textcls.rationale=1 --run.seed=$seed")
done
run_one() {
    local name=${1%%|*} args=${1#*|}
    [ -f "$OUT/$name/summary.json" ] && return 0
    # shellcheck disable=SC2086
    OMP_WAIT_POLICY=passive $D run examples/rationale.ini --run.name="$name" $common $args > "$OUT/$name.log" 2>&1 ||
        echo "FAILED: $name (see $OUT/$name.log)"
}
export -f run_one
export D OUT common
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
python3 - "$OUT" "$SEEDS" <<'PY'
import json, os, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split()
t = json.load(open(os.path.join(out, "teacher", "summary.json")))["teacher"]
print(f"teacher `{t['model']}` ({t['params']} parameters): test accuracy {100 * t['test_acc']:.2f} %\n")
print("| student | loss | rationale | test acc % (mean ± std) | seeds | train s (mean) |")
print("|---|---|---|---|---|---|")
for row, label in [("ce", "CE only"), ("kd", "KD"), ("kd_rat", "KD + rationales"), ("rat", "CE + rationales")]:
    acc, secs, loss, rat, model = [], [], "", 0, ""
    for s in seeds:
        p = os.path.join(out, f"{row}_s{s}", "summary.json")
        if not os.path.exists(p):
            continue
        st = json.load(open(p))["student"]
        acc.append(100 * st["test_acc"]); secs.append(st["train_seconds"])
        loss, rat, model = st["loss"], st["rationale"], st["model"]
    if not acc:
        continue
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {label} | `{loss}` | {rat:g} | {statistics.mean(acc):.2f} ± {sd:.2f} | {len(acc)} | {statistics.mean(secs):.0f} |")
PY
