#!/usr/bin/env bash
# Parity of the distillation table with PyTorch: bench/torch_kd.py trains
# the same MLP student with the same recipe on the same cached teacher
# logits; this prints distill's and PyTorch's mean ± std side by side.
# Needs bench/kd_table.sh to have run (runs/kd_table) and torch installed.
#   bench/kd_parity.sh [SEEDS...]      (env: OUT=runs/kd_table)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-0 1 2}
OUT=${OUT:-runs/kd_table}
python3 bench/torch_kd.py --cache "$OUT/teacher.cache" --seeds $SEEDS --method ce --method "kd:1:0.5" \
    --method "kd:4:0.9" --method "lab5k:1:0.9" > "$OUT/torch_kd.jsonl"
python3 - "$OUT" $SEEDS <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
th = [json.loads(l) for l in open(f"{out}/torch_kd.jsonl")]
def ms(a):
    a = [100 * x for x in a]
    return f"{statistics.mean(a):.2f} ± {statistics.stdev(a) if len(a) > 1 else 0:.2f}", statistics.mean(a)
def ours(name, role):
    return [json.load(open(f"{out}/{name}_s{s}/summary.json"))[role]["test_acc"] for s in seeds]
rows = [("CE baseline", ours("base", "baseline"), [t["test_acc"] for t in th if t["method"] == "ce"]),
        ("ce(weight=0.5) + kd(T=1, weight=0.5)", ours("kd_T1_a0.5", "student"), [t["test_acc"] for t in th if t["method"] == "kd:1:0.5"]),
        ("ce(weight=0.1) + kd(T=4, weight=0.9)", ours("kd_T4_a0.9", "student"), [t["test_acc"] for t in th if t["method"] == "kd:4:0.9"]),
        ("5000 labels: CE on them, 30 epochs", ours("lab5k", "baseline"), [t["baseline_acc"] for t in th if t["method"] == "lab5k:1:0.9"]),
        ("5000 labels + KD T=1 on all 60000", ours("lab5k", "student"), [t["test_acc"] for t in th if t["method"] == "lab5k:1:0.9"])]
print(f"| run | distill (mean ± std) | PyTorch (mean ± std) | difference |\n|---|---|---|---|")
for name, a, b in rows:
    (sa, ma), (sb, mb) = ms(a), ms(b)
    print(f"| {name} | {sa} | {sb} | {ma - mb:+.2f} |")
PY
