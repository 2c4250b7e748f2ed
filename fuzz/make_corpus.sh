#!/usr/bin/env bash
# make_corpus.sh - regenerates the fuzzers' seed corpora (fuzz/corpus/NAME/)
# and the generated dictionaries (fuzz/spec.dict, fuzz/config.dict) with the
# library itself (fuzz/make_corpus.c), plus copies of the example configs
# and a safetensors fixture written by PyTorch's library. The output is
# committed; run this again when a format or the loss/config schema changes.
# Inputs that once crashed a harness are kept as fuzz/corpus/NAME/regress_*.
set -euo pipefail
cd "$(dirname "$0")/.."
make -j2 build/make_corpus
tool=build/make_corpus
# inputs that once crashed (regress_*) stay; everything else is regenerated
if [ -d fuzz/corpus ]; then find fuzz/corpus -type f ! -name 'regress_*' -delete; fi
"$tool" fuzz
for d in fuzz/spec.dict fuzz/config.dict; do # one line per entry
    awk '!seen[$0]++' "$d" >"$d.new" && mv "$d.new" "$d"
done

cp tests/fixtures/st_python.safetensors fuzz/corpus/safetensors/
# configs: each example, then (after a NUL) command-line overrides
mkdir -p fuzz/corpus/config
for f in examples/*.ini; do
    cp "$f" "fuzz/corpus/config/$(basename "$f")"
done
printf '[train]\nepochs = 3\nlr = 0.1\n\0train.epochs=5\0student.model=mlp: 64\0distill.loss="kd(T=2)"' \
    >fuzz/corpus/config/overrides
printf '; comment\n[data]\nflip = true\ncrop=2 ; inline\n\n[distill]\nloss = '"'"'ce + kd'"'"'\n' \
    >fuzz/corpus/config/quotes
du -sh fuzz/corpus
