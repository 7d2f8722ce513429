#!/usr/bin/env sh
# The soak (not part of CI): scripts/soak.sh [MINUTES] [driver options...]
#
# Builds keygate-server, examples/protected and the driver (examples/soak) in release,
# then runs the driver for MINUTES (default 10): two key-service replicas on one
# PostgreSQL database, protected in front of them under load, keys revoked, disabled,
# re-enabled and rotated, replicas restarted and the event stream cut; every answer
# checked against the truth, memory and descriptors recorded (examples/soak/main.rs
# says what is checked and how). Exits non-zero on a wrong answer, an unexpected one,
# or memory or descriptors that grow.
#
# KEYGATE_SOAK_POSTGRES_URL names the database (default
# postgres://postgres@127.0.0.1:5432/keygate_soak): the driver creates it and drops it
# at the end. Output (logs, resources.csv, summary.txt) goes to target/soak/.
set -eu
minutes=${1:-10}
[ $# -ge 1 ] && shift
cd "$(dirname "$0")/.."
cargo build --release --features server,postgres --bin keygate-server --example protected --example soak
exec target/release/examples/soak --minutes "$minutes" "$@"
