#!/usr/bin/env bash
# Idle scale: N (default 10000) idle authenticated clients against the release binary; prints
# the connect rate and pgtenant's RSS per idle client. Asserts nothing; not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pgtenant
cargo build --release --example idle
ulimit -n 65536 || ulimit -n "$(ulimit -Hn)"
exec ./target/release/examples/idle "$@"
