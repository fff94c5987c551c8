#!/usr/bin/env bash
# Load comparison: pgbench -S direct vs through pgtenant (same run, medians, ratios,
# added latency per query, pgtenant CPU per transaction). Arguments go to examples/load.rs,
# e.g. scripts/bench.sh --seconds 10 --rounds 3 --clients 1,16 --modes simple,extended
set -euo pipefail
cd "$(dirname "$0")/.."
# Two builds: built together, the binary would get the dev-dependencies' features (tokio's
# `process`, whose orphan reaping runs at every runtime park) and not be the one users run.
cargo build --release --bin pgtenant
cargo build --release --example load
if [ ! -x /usr/sbin/pgbouncer ] && command -v apt-get >/dev/null; then
  apt-get install -y pgbouncer >/dev/null || echo "pgbouncer not installed; comparing with direct only" >&2
fi
exec ./target/release/examples/load "$@"
