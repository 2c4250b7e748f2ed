#!/usr/bin/env bash
# The distillation results table (docs/RESULTS.md): a 784-128-10 MLP student
# distilled from the reference teacher on Fashion-MNIST, 8 epochs, SGD
# recipe of examples/fashion_kd.ini, no student augmentation, over seeds;
# then the unlabelled-transfer setting (5000 labels). The teacher's logits
# come from a full-logit cache, which trains bit-identically to the online
# teacher when augmentation is off (tests/test_cache.c), so the table costs
# minutes instead of hours.
#   bench/kd_table.sh TEACHER.safetensors [SEEDS...]
#   env: OUT=runs/kd_table THREADS=2 EPOCHS=8 STUDENT="mlp: 128" TRANSFER=1
#        AUG=1: the students train with crop 2 + flip and the teacher sees
#        the same views: one cache per seed with EPOCHS views per example
#        (`distill cache --views`, Fast Knowledge Distillation's recipe),
#        since a cache's views are drawn from the run's seed
# Runs whose summary.json exists are not run again, so the table can be
# extended (new methods, seeds) without repeating finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${1:?usage: bench/kd_table.sh TEACHER.safetensors [SEEDS...]}
shift
SEEDS=${*:-0 1 2}
OUT=${OUT:-runs/kd_table}
T=${THREADS:-2}
EPOCHS=${EPOCHS:-8}
STUDENT=${STUDENT:-mlp: 128}
TRANSFER=${TRANSFER:-1}
mkdir -p "$OUT"
AUG=${AUG:-0}
CACHE="$OUT/teacher.cache"
if [ "$AUG" = 1 ]; then
    for s in $SEEDS; do
        c="$OUT/teacher_s$s.cache"
        [ -f "$c" ] || build/distill cache "$TEACHER" --out "$c" --views "$EPOCHS" --crop 2 --flip 1 --seed "$s" \
            --threads "$T" | tee "$OUT/cache_s$s.txt"
    done
    DATA_AUG=(--data.crop=2 --data.flip=1)
else
    [ -f "$CACHE" ] || build/distill cache "$TEACHER" --out "$CACHE" --threads "$T" | tee "$OUT/cache.txt"
    DATA_AUG=(--data.crop=0 --data.flip=0)
fi
METHODS=(
  "kd_T1_a0.5|ce(weight=0.5) + kd(T=1, weight=0.5)"
  "kd_T2_a0.5|ce(weight=0.5) + kd(T=2, weight=0.5)"
  "kd_T2_a0.9|ce(weight=0.1) + kd(T=2, weight=0.9)"
  "kd_T4_a0.9|ce(weight=0.1) + kd(T=4, weight=0.9)"
  "dkd|ce + dkd(alpha=1, beta=8, T=4, warmup=1)"
  "dkd_w0.1|ce + dkd(alpha=1, beta=8, T=4, warmup=1, weight=0.1)"
  "kd_std|ce(weight=0.1) + kd(T=2, weight=9, standardize=1)"
  "dist|ce + dist(beta=1, gamma=1, tau=1)"
  "nkd|ce + nkd(T=1, gamma=1.5)"
)
printf '%s\n' "${METHODS[@]}" > "$OUT/methods.txt"
common=(--quiet --threads "$T" --run.out="$OUT" --teacher.checkpoint="$TEACHER"
        --train.epochs="$EPOCHS" "${DATA_AUG[@]}" --train.eval_every=100 --student.model="$STUDENT")
run() { # NAME ARGS...: one run unless it is already done
  local name=$1; shift
  local cache=$CACHE
  [ "$AUG" = 1 ] && cache="$OUT/teacher_s$SEED.cache"
  [ -f "$OUT/$name/summary.json" ] || build/distill run examples/fashion_kd.ini "${common[@]}" --teacher.cache="$cache" \
      --run.name="$name" "$@" > /dev/null
}
for s in $SEEDS; do
  SEED=$s
  run "base_s$s" --run.seed="$s" --distill.baseline=1 --distill.loss="ce"
  for m in "${METHODS[@]}"; do
    name=${m%%|*}; spec=${m#*|}
    run "${name}_s$s" --run.seed="$s" --distill.baseline=0 --distill.loss="$spec"
  done
  # unlabelled transfer set: 5000 labels; baseline on those, student on all 60000
  if [ "$TRANSFER" = 1 ]; then
    run "lab5k_s$s" --run.seed="$s" --data.labeled=5000 --distill.baseline_epochs=30 \
        --distill.loss="ce(weight=0.1) + kd(T=1, weight=0.9)"
  fi
done
python3 - "$OUT" "$EPOCHS" "$STUDENT" "$TRANSFER" $SEEDS <<'PY'
import json, statistics, sys, os
out, epochs, student, transfer, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5:]
def summ(name, role):
    return [json.load(open(f"{out}/{name}_s{s}/summary.json"))[role] for s in seeds]
def row(label, objs, base=None):
    a = [o["test_acc"] * 100 for o in objs]
    m = statistics.mean(a); sd = statistics.stdev(a) if len(a) > 1 else 0.0
    d = f"{m - base:+.2f}" if base is not None else ""
    return f"| {label} | {m:.2f} ± {sd:.2f} | {d} | {', '.join(f'{x:.2f}' for x in a)} |", m
aug = "crop 2 + flip, the teacher's logits on the same views" if os.path.exists(f"{out}/teacher_s{seeds[0]}.cache") else "no augmentation"
print(f"Student `{student}`, {epochs} epochs, {aug}, seeds {' '.join(seeds)}; last-epoch test accuracy.\n")
print("| method (loss spec) | test acc % (mean ± std) | vs CE | per seed |\n|---|---|---|---|")
teacher = summ("base", "teacher")
line, _ = row("teacher (cnn: c32 c32 p c64 c64 p f256 d0.3)", teacher); print(line)
line, base = row("CE baseline (`ce`)", summ("base", "baseline")); print(line)
for name, spec in [l.split("|", 1) for l in open(f"{out}/methods.txt").read().strip().splitlines()]:
    line, _ = row(f"`{spec}`", summ(name, "student"), base); print(line)
if not transfer:
    sys.exit(0)
print(f"\nUnlabelled transfer set: only 5000 training images keep labels.\n")
print("| run | test acc % (mean ± std) | vs CE | per seed |\n|---|---|---|---|")
line, b5 = row("CE on the 5000 labelled images (30 epochs)", summ("lab5k", "baseline")); print(line)
line, _ = row(f"`ce(weight=0.1) + kd(T=1, weight=0.9)`, soft labels on all 60000 ({epochs} epochs)", summ("lab5k", "student"), b5); print(line)
PY
