#!/usr/bin/env bash
# LELP (issue 6 item 1; docs/losses/lelp.md) on a few-class task:
# Fashion-MNIST as a binary problem (classes 0-4 vs 5-9, [data] label_map),
# a CNN teacher trained here on the first TEACHER_LIMIT training images,
# and an MLP student that sees only the first LIMIT of them (the setting
# where a teacher has something to add). Rows, each over seeds:
#   CE (the baseline stage of the KD runs), KD (T=4), KD at the LELP rows'
#   temperature (T=1), LELP S=5, LELP without the null-space projection,
#   LELP without the rotation.
# Students train without augmentation (LELP's targets are per stored image);
# the teacher with crop 2 + flip. One teacher (seed 0) teaches every seed.
# Prints mean ± std of the last-epoch test accuracy (binary, full test set)
# as a markdown table.
#   bench/lelp_table.sh [SEEDS...]            (default seeds: 0 1 2)
#   env: OUT=runs/lelp_table THREADS=1 LIMIT=2000 EPOCHS=30
#        TEACHER_LIMIT=60000 TEACHER_EPOCHS=3 S=5 LELP_T=1
#        KD="ce(weight=0.5) + kd(T=4, weight=0.5)"     the KD row's loss
#        KD1="ce(weight=0.5) + kd(T=1, weight=0.5)"    the second KD row (same terms as LELP)
#        LELP_LOSS="ce(weight=0.5) + kd(T=1, weight=0.5)"  the LELP rows' loss (kd
#        against the pseudo-subclass targets, ce on the summed class logits)
# Runs whose summary.json exists are not run again; change OUT when you
# change a setting.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
OUT=${OUT:-runs/lelp_table}
T=${THREADS:-1}
LIMIT=${LIMIT:-2000}
EPOCHS=${EPOCHS:-30}
TEACHER_LIMIT=${TEACHER_LIMIT:-60000}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-3}
S=${S:-5}
LELP_T=${LELP_T:-1}
TEACHER_MODEL="cnn: c32 p c64 p f256 d0.3"
STUDENT="mlp: 128"
MAP="0 0 0 0 0 1 1 1 1 1"
KD=${KD:-ce(weight=0.5) + kd(T=4, weight=0.5)}
KD1=${KD1:-ce(weight=0.5) + kd(T=1, weight=0.5)}
LELP_LOSS=${LELP_LOSS:-ce(weight=0.5) + kd(T=1, weight=0.5)}
TEACHER=$OUT/teacher/teacher.safetensors
mkdir -p "$OUT"
[ -x build/distill ] || { echo "build/distill missing: run make first" >&2; exit 1; }
if [ ! -f "$OUT/teacher/summary.json" ]; then
    echo "training the teacher ($TEACHER_MODEL, $TEACHER_LIMIT images, $TEACHER_EPOCHS epochs)" >&2
    build/distill run examples/fashion_kd.ini --quiet --threads "$T" --run.out="$OUT" --run.name=teacher \
        --data.label_map="$MAP" --data.limit="$TEACHER_LIMIT" --teacher.model="$TEACHER_MODEL" \
        --teacher.checkpoint= --teacher.epochs="$TEACHER_EPOCHS" --teacher.crop=2 --teacher.flip=1 \
        --train.epochs="$TEACHER_EPOCHS" --student.model= > /dev/null
fi
common=(--quiet --threads "$T" --run.out="$OUT" --data.label_map="$MAP" --data.limit="$LIMIT"
        --teacher.model="$TEACHER_MODEL" --teacher.checkpoint="$TEACHER" --data.crop=0 --data.flip=0
        --train.epochs="$EPOCHS" --train.batch=64 --train.eval_every=1000 --student.model="$STUDENT")
METHODS=(
  "lelp|LELP S=$S (null-space projection, rotation)|--distill.lelp=$S --distill.lelp_T=$LELP_T"
  "lelp_nonull|LELP S=$S without the null-space projection|--distill.lelp=$S --distill.lelp_T=$LELP_T --distill.lelp_null=0"
  "lelp_norot|LELP S=$S without the rotation|--distill.lelp=$S --distill.lelp_T=$LELP_T --distill.lelp_rotate=0"
)
printf '%s\n' "${METHODS[@]}" > "$OUT/methods.txt"
run() { # NAME ARGS...: one run unless it is already done
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  echo "run $name" >&2
  build/distill run examples/fashion_kd.ini "${common[@]}" --run.name="$name" "$@" > /dev/null
}
for s in $SEEDS; do
  run "kd_s$s" --run.seed="$s" --distill.baseline=1 --distill.loss="$KD"
  run "kd1_s$s" --run.seed="$s" --distill.baseline=0 --distill.loss="$KD1"
  for m in "${METHODS[@]}"; do
    name=${m%%|*}; rest=${m#*|}; args=${rest#*|}
    # shellcheck disable=SC2086
    run "${name}_s$s" --run.seed="$s" --distill.baseline=0 --distill.loss="$LELP_LOSS" $args
  done
done
python3 - "$OUT" "$EPOCHS" "$LIMIT" "$STUDENT" "$TEACHER_MODEL" "$KD" "$LELP_LOSS" "$KD1" $SEEDS <<'PY'
import json, statistics, sys
out, epochs, limit, student, teacher, kd, lelp_loss, kd1, seeds = sys.argv[1:9] + [sys.argv[9:]]
def summ(name, role):
    return [json.load(open(f"{out}/{name}_s{s}/summary.json"))[role] for s in seeds]
def row(label, objs, base=None):
    a = [o["test_acc"] * 100 for o in objs]
    m = statistics.mean(a); sd = statistics.stdev(a) if len(a) > 1 else 0.0
    d = f"{m - base:+.2f}" if base is not None else ""
    return f"| {label} | {m:.2f} ± {sd:.2f} | {d} | {', '.join(f'{x:.2f}' for x in a)} |", m
t = json.load(open(f"{out}/teacher/summary.json"))["teacher"]
print(f"Fashion-MNIST as 0-4 vs 5-9. Teacher `{teacher}` ({t['test_acc'] * 100:.2f} %) -> student "
      f"`{student}` trained on the first {limit} images for {epochs} epochs, no augmentation, "
      f"seeds {' '.join(seeds)}; last-epoch test accuracy on the 10000 test images.\n")
print("| method | test acc % (mean ± std) | vs CE | per seed |\n|---|---|---|---|")
line, base = row("CE (`ce`)", summ("kd", "baseline")); print(line)
line, _ = row(f"KD (`{kd}`)", summ("kd", "student"), base); print(line)
line, _ = row(f"KD at T=1 (`{kd1}`)", summ("kd1", "student"), base); print(line)
for name, label, _args in [l.split("|", 2) for l in open(f"{out}/methods.txt").read().strip().splitlines()]:
    line, _ = row(f"{label} (`{lelp_loss}`)", summ(name, "student"), base); print(line)
PY
