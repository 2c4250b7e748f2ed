#!/usr/bin/env bash
# make bench-lm: language-model training and distillation steps against
# PyTorch on the same GPT, batch and sequence length, interleaved in the same
# run (median of REPS); generation tokens/s of the KV-cache runner.
#   bench/lm.sh BUILD_DIR   (env: REPS=3 SECONDS_PER=5 THREADS=2 BATCH=16 SEQ=128 TEACHER=... STUDENT=...)
set -euo pipefail
B=${1:-build}
REPS=${REPS:-3}
SEC=${SECONDS_PER:-5}
T=${THREADS:-2}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
TEACHER=${TEACHER:-"gpt: layers=4 dim=256 heads=8 ctx=128"}
STUDENT=${STUDENT:-"gpt: layers=2 dim=128 heads=4 ctx=128"}
out=$(mktemp -d)
have_torch=0
if python3 -c "import torch" 2>/dev/null; then have_torch=1; fi
echo "bench-lm: teacher '$TEACHER', student '$STUDENT', batch $BATCH x $SEQ tokens, $T threads, $REPS x ${SEC}s"
for mode in train distill; do
    for r in $(seq "$REPS"); do
        OMP_WAIT_POLICY=passive "$B/bench_lm" --mode $mode --teacher "$TEACHER" --student "$STUDENT" --batch "$BATCH" \
            --seq "$SEQ" --threads "$T" --seconds "$SEC" >> "$out/ours_$mode.jsonl"
        if [ $have_torch = 1 ]; then
            OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=$T python3 bench/torch_lm.py --mode $mode --teacher "$TEACHER" \
                --student "$STUDENT" --batch "$BATCH" --seq "$SEQ" --threads "$T" --seconds "$SEC" >> "$out/torch_$mode.jsonl"
        fi
    done
done
OMP_WAIT_POLICY=passive "$B/bench_lm" --mode generate --teacher "$TEACHER" --batch "$BATCH" --seq "$SEQ" \
    --threads "$T" --seconds "$SEC" > "$out/gen.jsonl"
python3 - "$out" "$have_torch" <<'PY'
import json, statistics, sys
d, have = sys.argv[1], sys.argv[2] == "1"
med = lambda f, k: statistics.median(json.loads(l)[k] for l in open(f))
for mode, what in (("train", "teacher training step"), ("distill", "distillation step (teacher fwd + student step)")):
    o = med(f"{d}/ours_{mode}.jsonl", "tokens_per_s")
    line = f"{what:48s} distill {o:9.0f} tokens/s"
    if have:
        t = med(f"{d}/torch_{mode}.jsonl", "tokens_per_s")
        line += f"   pytorch {t:9.0f} tokens/s   ratio {o/t:.2f}x"
    rss = med(f"{d}/ours_{mode}.jsonl", "peak_rss_mb")
    line += f"   (our peak RSS {rss:.0f} MiB)"
    print(line)
g = json.loads(open(f"{d}/gen.jsonl").read())
print("generation (KV cache, teacher): " + ", ".join(f"{k.replace('tokens_per_s_', 'batch ')[6:]} {v:.0f} tokens/s"
                                                    for k, v in g.items() if k.startswith("tokens_per_s")))
if have:
    import torch
    print(f"(torch {torch.__version__})")
PY
