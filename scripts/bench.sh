#!/usr/bin/env bash
# Load comparison: pgbench -S direct vs through pgtenant (same run, medians, ratios,
# added latency per query, pgtenant CPU per transaction). Arguments go to examples/load.rs,
# e.g. scripts/bench.sh --seconds 10 --rounds 3 --clients 1,16 --modes simple,extended
#
# pgtenant is the build to ship: the release profile with profile-guided optimisation
# (scripts/pgo.sh, about 10 minutes the first time). PGO=0 measures the plain release build
# instead; PLAIN=1 measures both in the same run (the plain one as `plain` and `plain+vrf`).
set -euo pipefail
cd "$(dirname "$0")/.."
# Separate builds: built together, the binary would get the dev-dependencies' features
# (tokio's `process`, whose orphan reaping runs at every runtime park) and not be the one
# users run.
cargo build --release --bin pgtenant
cargo build --release --example load
EXTRA=()
if [ "${PGO:-1}" != 0 ]; then
  scripts/pgo.sh
  export PGTENANT_BIN=$PWD/target/pgo/release/pgtenant
  [ "${PLAIN:-0}" != 0 ] && EXTRA=(--plain-binary "$PWD/target/release/pgtenant")
fi
if [ ! -x /usr/sbin/pgbouncer ] && command -v apt-get >/dev/null; then
  apt-get install -y pgbouncer >/dev/null || echo "pgbouncer not installed; comparing with direct only" >&2
fi
exec ./target/release/examples/load "${EXTRA[@]}" "$@"
