#!/usr/bin/env bash
# Multi-task distillation with teacher annealing (issue 6 item 8;
# docs/losses/multitask.md) on Fashion-MNIST as three tasks, one teacher
# per task (examples/fashion_multitask.ini gives the maps):
#   fine (10 classes), wear (top/bottom, 2), tops (T-shirt, Pullover, Coat,
#   Shirt, other: 5).
# Teachers: `cnn: c16 p c32 p f128`, 3 epochs on all 60k training images
# with crop 2 + flip (examples/fashion_teacher.ini's recipe otherwise), one
# per task, trained once (seed 0) and shared by every row and seed.
# Students: `mlp: 128` trunk, LIMIT training examples, EPOCHS epochs, SGD +
# cosine, no augmentation unless the row says so. Rows:
#   single-task CE and single-task plain KD (one student per task, each
#     EPOCHS epochs: three times the student compute of a multi-task row);
#   multi-task (one trunk, three heads) with CE, plain KD
#     ce(weight=0.5) + kd(T=1, weight=0.5) (= a fixed target 0.5 teacher +
#     0.5 gold), annealed KD anneal(T=1) (target from teacher to gold), and
#     annealed KD with crop 2 + flip augmentation (teachers see the view).
# Prints a markdown table: per task, mean ± std over seeds of the
# last-epoch test accuracy on the full 10k test set.
#   bench/multitask_table.sh [SEEDS...]       (default seeds: 0 1 2)
#   env: OUT=runs/multitask_table THREADS=1 EPOCHS=10 LIMIT=10000
#        TEACHER_DIR=DIR (default: OUT) holding teacher_TASK/ runs (trained there if missing)
# Runs whose summary.json exists are not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
OUT=${OUT:-runs/multitask_table}
T=${THREADS:-1}
EPOCHS=${EPOCHS:-10}
LIMIT=${LIMIT:-10000}
TD=${TEACHER_DIR:-$OUT}
TEACHER_MODEL="cnn: c16 p c32 p f128"
STUDENT="mlp: 128"
KD="ce(weight=0.5) + kd(T=1, weight=0.5)"
TASKS=(fine wear tops)
declare -A MAP=([fine]="0 1 2 3 4 5 6 7 8 9" [wear]="0 1 0 0 0 1 0 1 0 1" [tops]="0 4 1 4 2 4 3 4 4 4")
mkdir -p "$OUT"
[ -x build/distill ] || { echo "build/distill missing: run make first" >&2; exit 1; }
for t in "${TASKS[@]}"; do
  if [ ! -f "$TD/teacher_$t/summary.json" ]; then
    echo "teacher of task $t" >&2
    build/distill run examples/fashion_teacher.ini --quiet --threads "$T" --teacher.model="$TEACHER_MODEL" \
      --train.epochs=3 --data.label_map="${MAP[$t]}" --run.out="$TD" --run.name="teacher_$t" > /dev/null
  fi
done
tpaths="$TD/teacher_fine/teacher.safetensors $TD/teacher_wear/teacher.safetensors $TD/teacher_tops/teacher.safetensors"
maps="${MAP[fine]} | ${MAP[wear]} | ${MAP[tops]}"
common=(--quiet --threads "$T" --run.out="$OUT" --data.limit="$LIMIT" --data.crop=0 --data.flip=0
        --train.epochs="$EPOCHS" --train.eval_every=100 --student.model="$STUDENT")
run() { # NAME CONFIG ARGS...: one run unless it is already done
  local name=$1 cfg=$2; shift 2
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  echo "run $name" >&2
  build/distill run "$cfg" "${common[@]}" --run.name="$name" "$@" > /dev/null
}
for s in $SEEDS; do
  for t in "${TASKS[@]}"; do # single-task: CE baseline and plain KD in one run
    run "st_${t}_s$s" examples/fashion_kd.ini --run.seed="$s" --data.label_map="${MAP[$t]}" \
      --teacher.model="$TEACHER_MODEL" --teacher.checkpoint="$TD/teacher_$t/teacher.safetensors" \
      --distill.baseline=1 --distill.loss="$KD"
  done
  mt=(--run.seed="$s" --multitask.teachers="$tpaths" --multitask.maps="$maps" --multitask.tasks="fine wear tops")
  run "mt_ce_s$s" examples/fashion_multitask.ini "${mt[@]}" --distill.loss="ce"
  run "mt_kd_s$s" examples/fashion_multitask.ini "${mt[@]}" --distill.loss="$KD"
  run "mt_anneal_s$s" examples/fashion_multitask.ini "${mt[@]}" --distill.loss="anneal(T=1)"
  run "mt_anneal_aug_s$s" examples/fashion_multitask.ini "${mt[@]}" --distill.loss="anneal(T=1)" \
    --data.crop=2 --data.flip=1
done
python3 - "$OUT" "$TD" "$EPOCHS" "$LIMIT" "$STUDENT" "$TEACHER_MODEL" $SEEDS <<'PY'
import json, statistics, sys
out, td, epochs, limit, student, teacher, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
tasks = ["fine", "wear", "tops"]
def js(p): return json.load(open(f"{td if p.startswith('teacher_') else out}/{p}/summary.json"))
def cell(a):
    a = [x * 100 for x in a]
    sd = statistics.stdev(a) if len(a) > 1 else 0.0
    return f"{statistics.mean(a):.2f} ± {sd:.2f}", statistics.mean(a)
def line(label, per_task):  # per_task: {task: [acc per seed]}
    cells, means = zip(*(cell(per_task[t]) for t in tasks))
    avg = [statistics.mean(per_task[t][i] for t in tasks) for i in range(len(seeds))]
    print(f"| {label} | " + " | ".join(cells) + f" | {cell(avg)[0]} |")
print(f"Fashion-MNIST as three tasks; teachers `{teacher}` (one per task, 3 epochs on 60k, crop+flip); "
      f"student trunk `{student}`, {limit} training examples, {epochs} epochs, SGD cosine, seeds {' '.join(seeds)}; "
      f"last-epoch test accuracy % on the 10k test set (mean ± std over seeds).\n")
print("| row | fine (10) | wear (2) | tops (5) | mean of tasks |\n|---|---|---|---|---|")
print("| teachers | " + " | ".join(f"{js('teacher_' + t)['teacher']['test_acc'] * 100:.2f}" for t in tasks) + " | |")
line("single-task CE (3 students)", {t: [js(f"st_{t}_s{s}")["baseline"]["test_acc"] for s in seeds] for t in tasks})
line("single-task KD `ce(weight=0.5) + kd(T=1, weight=0.5)` (3 students)",
     {t: [js(f"st_{t}_s{s}")["student"]["test_acc"] for s in seeds] for t in tasks})
for name, label in [("mt_ce", "multi-task CE `ce`"), ("mt_kd", "multi-task KD `ce(weight=0.5) + kd(T=1, weight=0.5)`"),
                    ("mt_anneal", "multi-task annealed KD `anneal(T=1)`"),
                    ("mt_anneal_aug", "multi-task annealed KD `anneal(T=1)` + crop/flip")]:
    line(label, {t: [js(f"{name}_s{s}")["student"]["tasks"][t]["test_acc"] for s in seeds] for t in tasks})
PY
