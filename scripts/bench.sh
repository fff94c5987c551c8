#!/usr/bin/env bash
# Load comparison: pgbench -S direct vs through pgtenant (same run, medians, ratios,
# added latency per query, pgtenant CPU per transaction). Arguments go to examples/load.rs,
# e.g. scripts/bench.sh --seconds 10 --rounds 3 --clients 1,16 --modes simple,extended
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pgtenant --example load
if [ ! -x /usr/sbin/pgbouncer ] && command -v apt-get >/dev/null; then
  apt-get install -y pgbouncer >/dev/null || echo "pgbouncer not installed; comparing with direct only" >&2
fi
exec ./target/release/examples/load "$@"
