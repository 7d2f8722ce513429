#!/usr/bin/env sh
# Runs one fuzz target for a number of executions: scripts/fuzz.sh TARGET [RUNS]
#
# TARGET is one of extract, key, scope, sse, wire (fuzz/fuzz_targets/); RUNS defaults
# to 1 000 000. Needs cargo-fuzz (`cargo install cargo-fuzz`); runs on the stable
# toolchain without a sanitizer (set TOOLCHAIN=nightly to build with nightly instead).
# New inputs go to fuzz/corpus/TARGET; a failing input is written to
# fuzz/artifacts/TARGET/ and the run stops with its error. Extra arguments after RUNS
# go to libFuzzer (for example -max_total_time=600).
set -eu
target=${1:?usage: scripts/fuzz.sh TARGET [RUNS] [libFuzzer options...]}
runs=${2:-1000000}
[ $# -ge 2 ] && shift 2 || shift 1
cd "$(dirname "$0")/../fuzz"
mkdir -p "corpus/$target"
exec cargo "+${TOOLCHAIN:-stable}" fuzz run --sanitizer none --release "$target" \
    "corpus/$target" "seeds/$target" -- -runs="$runs" -print_final_stats=1 "$@"
