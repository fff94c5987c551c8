#!/usr/bin/env bash
# Abuse figures: what one tenant's attacks cost the others (brute force, half-open flood,
# parse and notification floods, abandoned statements), against the release binary.
# Prints figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pgtenant
cargo build --release --example abuse
ulimit -n 65536 || ulimit -n "$(ulimit -Hn)"
exec ./target/release/examples/abuse "$@"
