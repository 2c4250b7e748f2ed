#!/usr/bin/env bash
# Accuracy of the reference teacher recipe (examples/fashion_teacher.ini) in
# distill and in PyTorch (bench/torch_fashion.py, the same model, optimiser,
# schedule, augmentation and epochs), over seeds; writes a markdown table.
#   bench/teacher_table.sh [SEEDS...]     (env: EPOCHS=15 THREADS=2 OUT=runs/teacher_table TORCH=1)
# Finished runs are not repeated; TORCH=0 skips the PyTorch side (the table
# then reports PyTorch for the seeds that have a finished run).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
EPOCHS=${EPOCHS:-15}
T=${THREADS:-2}
OUT=${OUT:-runs/teacher_table}
mkdir -p "$OUT"
for s in $SEEDS; do
    [ -f "$OUT/distill_s$s/summary.json" ] || build/distill run examples/fashion_teacher.ini --quiet --threads "$T" \
        --run.seed="$s" --train.epochs="$EPOCHS" --run.out="$OUT" --run.name="distill_s$s" > /dev/null
    done_torch=$( [ -f "$OUT/torch_s$s.jsonl" ] && grep -c '"epoch": '"$EPOCHS"',' "$OUT/torch_s$s.jsonl" || true)
    if [ "${TORCH:-1}" = 1 ] && [ "$done_torch" != 1 ] && python3 -c "import torch" 2>/dev/null; then
        OPENBLAS_NUM_THREADS=1 python3 bench/torch_fashion.py --train --threads "$T" --seed "$s" \
            --epochs "$EPOCHS" > "$OUT/torch_s$s.jsonl"
    fi
done
python3 - "$OUT" $SEEDS <<'PY'
import json, statistics, sys, os
out, seeds = sys.argv[1], sys.argv[2:]
def row(name, accs, secs):
    m = statistics.mean(accs); sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"| {name} | {100*m:.2f} ± {100*sd:.2f} | {', '.join(f'{100*a:.2f}' for a in accs)} | {statistics.mean(secs):.0f} |"
ours = [json.load(open(f"{out}/distill_s{s}/summary.json"))["teacher"] for s in seeds]
lines = ["| implementation | test acc % (mean ± std) | per seed | train s |", "|---|---|---|---|",
         row("distill", [o["test_acc"] for o in ours], [o["train_seconds"] for o in ours])]
def finished(s):
    p = f"{out}/torch_s{s}.jsonl"
    return os.path.exists(p) and [json.loads(l) for l in open(p)][-1]["epoch"] == int(os.environ.get("EPOCHS", "15"))
ts = [s for s in seeds if finished(s)]
if ts:
    th = [[json.loads(l) for l in open(f"{out}/torch_s{s}.jsonl")][-1] for s in ts]
    lines.append(row(f"PyTorch (seeds {' '.join(ts)})", [t["test_acc"] for t in th], [t["seconds"] for t in th]))
print("\n".join(lines))
PY
