#!/usr/bin/env bash
# The exported C model (distill export, float32 and --int8) against ONNX
# Runtime running the same student exported from PyTorch, measured in one
# run on the 10000 Fashion-MNIST test images (docs/PERFORMANCE.md, section
# "Exported C model vs ONNX Runtime"; docs/export.md).
#
#   bench/export_bench.sh [BUILD] [CHECKPOINT...]
#
# Without checkpoints it distils two students with examples/fashion_kd.ini
# shortened (20000 training images, a cnn: c16 p c32 p f128 teacher trained
# 1 epoch, students 3 epochs; about 2-3 minutes on 2 cores), `mlp: 128` and
# `cnn: c8 p c16 p f64`, into $OUT/{mlp,cnn}/student.safetensors, reused when
# present. Each checkpoint is exported twice, each export compiled with
# `cc $CFLAGS_EXPORT` (default -O2) into bench/export_harness.c, and
# bench/export_bench.py measures both and ONNX Runtime (installed from PyPI
# into a venv, $VENV, that sees the system's torch) and prints the table.
# env: OUT=runs/export_bench  REPS=3  CFLAGS_EXPORT=-O2  VENV=BUILD/export-venv  ORT_INT8=1
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
shift || true
OUT=${OUT:-runs/export_bench}
REPS=${REPS:-3}
CFLAGS_EXPORT=${CFLAGS_EXPORT:--O2}
VENV=${VENV:-$BUILD/export-venv}
ORT_INT8=${ORT_INT8:-1}
DISTILL=$BUILD/distill
test -x "$DISTILL" || { echo "export_bench: $DISTILL not built (make)" >&2; exit 2; }
mkdir -p "$OUT"

test -x "$VENV/bin/python" || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -c "import onnxruntime, onnx" 2>/dev/null ||
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet onnxruntime onnx

CKPTS=("$@")
NAMES=()
if [ ${#CKPTS[@]} -eq 0 ]; then
    for pair in "mlp|mlp: 128" "cnn|cnn: c8 p c16 p f64"; do
        name=${pair%%|*} spec=${pair#*|}
        ck=$OUT/$name/student.safetensors
        if [ ! -f "$ck" ]; then
            echo "export_bench: distilling $spec into $ck" >&2
            "$DISTILL" run examples/fashion_kd.ini --quiet --run.out="$OUT" --run.name="$name" \
                --student.model="$spec" --teacher.model="cnn: c16 p c32 p f128" \
                --teacher.checkpoint="$OUT/teacher.safetensors" --teacher.epochs=1 \
                --data.limit=20000 --train.epochs=3 --distill.baseline=0 >&2
        fi
        CKPTS+=("$ck")
        NAMES+=("$name")
    done
else
    for ck in "${CKPTS[@]}"; do NAMES+=("$(basename "$ck" .safetensors)"); done
fi

ARGS=()
for i in "${!CKPTS[@]}"; do
    ck=${CKPTS[$i]} name=${NAMES[$i]}
    for v in fp32 int8; do
        d=$OUT/$name/c_$v
        mkdir -p "$d"
        "$DISTILL" export "$ck" --c "$d" $([ $v = int8 ] && echo --int8) >&2
        cc $CFLAGS_EXPORT -std=c99 -Wall -Wextra -Werror -pedantic -c "$d/model.c" -o "$d/model.o"
        cc $CFLAGS_EXPORT -std=c99 -I"$d" bench/export_harness.c "$d/model.o" -lm -o "$d/bench"
    done
    ARGS+=(--model "$name" "$ck" "$OUT/$name/c_fp32" "$OUT/$name/c_int8")
done
echo "export_bench: load average before timing: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2
"$VENV/bin/python" bench/export_bench.py --work "$OUT/work" --reps "$REPS" --cflags="$CFLAGS_EXPORT" \
    --json "$OUT/results.json" $([ "$ORT_INT8" = 1 ] && echo --ort-int8) "${ARGS[@]}"
