#!/usr/bin/env bash
# run.sh BUILD NAME SECONDS - runs one libFuzzer harness (BUILD/fuzz_NAME)
# for SECONDS, single process. Seeds come from fuzz/corpus/NAME (read only);
# new inputs go to BUILD/corpus/NAME, so a later run starts where this one
# stopped and nothing is written into the source tree. A crash, leak,
# timeout or out-of-memory exits non-zero with its input saved under
# BUILD/crashes/; the whole log is BUILD/logs/NAME.log. Extra libFuzzer
# flags may be given in FUZZ_FLAGS.
set -euo pipefail
build=$1 name=$2 seconds=$3
bin=$build/fuzz_$name
mkdir -p "$build/corpus/$name" "$build/crashes" "$build/logs"
dict=()
if [ -f "fuzz/$name.dict" ]; then dict=(-dict="fuzz/$name.dict"); fi
log=$build/logs/$name.log
echo "fuzz_$name: $seconds s (log $log)"
rc=0
# -timeout: one input taking 25 s is a hang; -rss_limit_mb: the default 2 GB
"$bin" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build/crashes/$name-" "${dict[@]}" ${FUZZ_FLAGS:-} \
    "$build/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz_$name: FAILED (exit $rc); the input is under $build/crashes/" >&2
    exit 1
fi
# the last status line (#N DONE ...) and the final statistics
grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
echo "corpus: $(find "$build/corpus/$name" -type f | wc -l) files in $build/corpus/$name"
