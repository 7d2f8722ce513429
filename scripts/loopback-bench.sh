#!/bin/sh
# The end-to-end loopback benchmark (benches/loopback.rs), from the repository root:
#
#   scripts/loopback-bench.sh                # 5 rounds of 3 s per variant
#   scripts/loopback-bench.sh 9 5            # 9 rounds of 5 s
#
# Prints each round, then the markdown table the README keeps. Linux, 2 CPUs or more;
# binds 127.0.0.1 only and stops by itself (a watchdog ends it if a round hangs).
set -eu
cd "$(dirname "$0")/.."
exec cargo bench --bench loopback -- --rounds "${1:-5}" --secs "${2:-3}"
