#!/usr/bin/env bash
# make bench: our training step and eval forward against PyTorch's on the
# same model and batch, in the same run, interleaved (ours, theirs, ours, ...)
# so machine noise hits both; reports the median of the repetitions and the
# ratio. PyTorch runs at its best setting on this machine: torch threads = N,
# OPENBLAS_NUM_THREADS=1. Also: our sgemm rate (GFLOP/s achieved vs sgemm)
# and the peak RSS of a real teacher run.
#   bench/run.sh BUILD_DIR   (env: REPS=3 SECONDS_PER=4 THREADS=2 BATCH=128 MODEL=...)
set -euo pipefail
B=${1:-build}
REPS=${REPS:-3}
SEC=${SECONDS_PER:-4}
T=${THREADS:-2}
BATCH=${BATCH:-128}
MODEL=${MODEL:-"cnn: c32 c32 p c64 c64 p f256 d0.3"}
out=$(mktemp -d)
have_torch=0
if python3 -c "import torch" 2>/dev/null; then have_torch=1; fi
echo "bench: model '$MODEL', batch $BATCH, $T threads, $REPS repetitions of ${SEC}s; $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for r in $(seq "$REPS"); do
    OMP_WAIT_POLICY=passive "$B/bench_engine" --model "$MODEL" --batch "$BATCH" --threads "$T" --seconds "$SEC" >> "$out/ours.jsonl"
    if [ $have_torch = 1 ]; then
        OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=$T python3 bench/torch_fashion.py --bench --model "$MODEL" \
            --batch "$BATCH" --threads "$T" --seconds "$SEC" >> "$out/torch.jsonl"
    fi
done
python3 - "$out" "$have_torch" <<'PY'
import json, statistics, sys
d, have = sys.argv[1], sys.argv[2] == "1"
ours = [json.loads(l) for l in open(d + "/ours.jsonl")]
med = lambda xs, k: statistics.median(x[k] for x in xs)
o_tr, o_ev = med(ours, "train_samples_per_s"), med(ours, "eval_samples_per_s")
print(f"distill  train step {o_tr:8.0f} samples/s   eval forward {o_ev:8.0f} samples/s")
print(f"distill  {med(ours,'train_gflops'):.0f} GFLOP/s in training, {med(ours,'eval_gflops'):.0f} in eval; "
      f"cblas_sgemm alone {med(ours,'sgemm_gflops'):.0f} GFLOP/s on {ours[0]['sgemm_shape']} "
      f"-> {100*med(ours,'train_gflops')/med(ours,'sgemm_gflops'):.0f}% / {100*med(ours,'eval_gflops')/med(ours,'sgemm_gflops'):.0f}% of sgemm")
if have:
    th = [json.loads(l) for l in open(d + "/torch.jsonl")]
    t_tr, t_ev = med(th, "train_samples_per_s"), med(th, "eval_samples_per_s")
    print(f"pytorch  train step {t_tr:8.0f} samples/s   eval forward {t_ev:8.0f} samples/s   (torch {th[0]['torch']}, {th[0]['threads']} threads)")
    print(f"ratio    train {o_tr/t_tr:.2f}x   eval {o_ev/t_ev:.2f}x")
else:
    print("pytorch  not installed: no comparison (pip install torch)")
PY
# distillation steps: online teacher, cached teacher logits, plain student
for STUDENT in "mlp: 128" "cnn: c8 p c16 p bn=0"; do
    : > "$out/kd_ours.jsonl"; : > "$out/kd_torch.jsonl"
    for r in $(seq "$REPS"); do
        OMP_WAIT_POLICY=passive "$B/bench_engine" --model "$MODEL" --student "$STUDENT" --batch "$BATCH" --threads "$T" \
            --seconds "$SEC" >> "$out/kd_ours.jsonl"
        if [ $have_torch = 1 ]; then
            OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=$T python3 bench/torch_fashion.py --bench --model "$MODEL" \
                --student "$STUDENT" --batch "$BATCH" --threads "$T" --seconds "$SEC" >> "$out/kd_torch.jsonl"
        fi
    done
    python3 - "$out" "$have_torch" "$STUDENT" <<'PY'
import json, statistics, sys
d, have, student = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
med = lambda xs, k: statistics.median(x[k] for x in xs)
o = [json.loads(l) for l in open(d + "/kd_ours.jsonl")]
on, ca, pl = med(o, "kd_online_samples_per_s"), med(o, "kd_cached_samples_per_s"), med(o, "student_samples_per_s")
print(f"KD into '{student}': distill online {on:.0f}, cached {ca:.0f}, plain student {pl:.0f} samples/s "
      f"(cached step costs {pl/ca:.2f}x a plain student step)")
if have:
    t = [json.loads(l) for l in open(d + "/kd_torch.jsonl")]
    ton, tpl = med(t, "kd_online_samples_per_s"), med(t, "student_samples_per_s")
    print(f"KD into '{student}': pytorch online {ton:.0f}, plain student {tpl:.0f} samples/s -> "
          f"online {on/ton:.2f}x, cached vs pytorch online {ca/ton:.2f}x")
PY
done
# peak memory of a real (short) teacher run
if [ -x /usr/bin/time ]; then
    /usr/bin/time -v "$B/distill" run examples/fashion_teacher.ini --quiet --train.epochs=1 --data.limit=12800 \
        --run.out="$out/runs" --threads "$T" > /dev/null 2> "$out/time.txt" || true
    echo "peak RSS of a teacher run (60k images loaded, batch 128): $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$out/time.txt")"
fi
rm -rf "$out"
