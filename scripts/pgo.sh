#!/usr/bin/env bash
# The release binary built with profile-guided optimisation: the binary to ship and the one
# scripts/bench.sh measures. Three steps:
#   1. an instrumented build (-Cprofile-generate) in target/pgo-generate;
#   2. that binary serves a training run: the demo's clusters and tenants (a dedicated tenant
#      and a shared one on the verified context), pgbench in the simple, extended and
#      prepared protocols at 1 and 8 clients, over TLS and plaintext, a connection per
#      transaction (the login's SCRAM work), many-row results and COPY out, then session
#      pooling; it exits on SIGTERM, which writes its profile;
#   3. the build that uses the merged profile (-Cprofile-use) in target/pgo: the binary is
#      target/pgo/release/pgtenant.
# With the profile LLVM lays the code a transaction runs out contiguously and leaves what it
# never runs out of line: on this 2-core machine a transaction executes about 17% fewer
# instructions and misses the instruction cache about a fifth as often (valgrind's cache
# simulation: 82 times against 386), and the proxy's user-space CPU per transaction drops
# by about a third (see README.md, "Performance").
# Code the training never runs is optimised for size, not speed: it is still correct, only
# not tuned; add a workload here when a hot path is missing from it.
#
#   scripts/pgo.sh            (TRAIN_SECONDS=3 by default: each pgbench run's length)
#
# Needs pgbench, openssl and rustup's llvm-tools component (installed when missing). Takes
# about 10 minutes on 2 cores (two fat-LTO builds); a later run about 6 (the instrumented
# build rebuilds only pgtenant, the optimised one every crate, since the profile is new).
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_SECONDS=${TRAIN_SECONDS:-3}
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
  rustup component add llvm-tools
fi
BIN=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
PGBENCH=$BIN/pgbench
[ -x "$PGBENCH" ] || PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
PSQL=$(dirname "$PGBENCH")/psql
[ -x "$PSQL" ] || PSQL=psql

WORK=$(mktemp -d /tmp/pgtenant-pgo.XXXXXX)
chmod 755 "$WORK"
PROXY=
DEMO=
cleanup() {
  [ -n "$PROXY" ] && kill "$PROXY" 2>/dev/null
  # The demo removes its clusters on SIGINT.
  [ -n "$DEMO" ] && kill -INT "$DEMO" 2>/dev/null && sleep 3
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. The instrumented build. Build scripts are instrumented too; their profiles land in a
# directory of their own and are not used. (A fixed path: the flags are part of cargo's
# fingerprint, and the same flags let a second run rebuild only what changed.)
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PWD/target/pgo-generate/build-profiles" \
  CARGO_TARGET_DIR=target/pgo-generate cargo build --release --bin pgtenant
TRAINEE=target/pgo-generate/release/pgtenant

# 2. Training. The demo's own process (clusters, tenants, its idle proxy) is not profiled.
. scripts/demo-env.sh
LLVM_PROFILE_FILE="$WORK/demo-%p.profraw" start_demo "$TRAINEE" "$WORK/demo.log"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
# The configuration in a directory of its own (pgtenant watches the file's directory), with
# TLS, on a port of its own; $1 is the pool mode.
start_proxy() {
  PORT=$(free_port)
  rm -rf "$WORK/conf"
  mkdir "$WORK/conf"
  sed -e "0,/^addr = .*/s//addr = \"127.0.0.1:$PORT\"\n\n[listen.tls]\ncert = \"${WORK//\//\\/}\/cert.pem\"\nkey = \"${WORK//\//\\/}\/key.pem\"/" \
    -e "0,/^mode = .*/s//mode = \"$1\"/" "$CONFIG" >"$WORK/conf/pgtenant.toml"
  LLVM_PROFILE_FILE="$WORK/proxy-%p.profraw" "$TRAINEE" --config "$WORK/conf/pgtenant.toml" \
    >"$WORK/proxy.log" 2>&1 &
  PROXY=$!
  for _ in $(seq 60); do grep -q "pgtenant listening" "$WORK/proxy.log" && break; sleep 1; done
  grep -q "pgtenant listening" "$WORK/proxy.log" || { cat "$WORK/proxy.log" >&2; exit 1; }
}
# SIGTERM: the proxy ends its sessions and exits, which writes its profile.
stop_proxy() {
  kill -TERM "$PROXY"
  wait "$PROXY" || true
  PROXY=
}
url_of() {
  grep -o "postgresql://app\.$1[^\"]*" "$WORK/demo.log" | head -1 |
    sed -E "s/@127.0.0.1:[0-9]+/@127.0.0.1:$PORT/"
}

cat >"$WORK/point.sql" <<'EOF'
\set id random(1, 100000)
SELECT name FROM items WHERE id = :id;
EOF
cat >"$WORK/write.sql" <<'EOF'
\set id random(1, 100000)
BEGIN;
SELECT name FROM items WHERE id = :id;
SELECT count(*) FROM items WHERE id BETWEEN :id AND :id + 10;
END;
EOF
cat >"$WORK/rows.sql" <<'EOF'
SELECT * FROM items WHERE id <= 2000;
EOF
chmod 644 "$WORK"/*.sql
train() { # URL SSLMODE PGBENCH_ARGS...
  local url=$1 ssl=$2
  shift 2
  if ! PGSSLMODE=$ssl "$PGBENCH" -n "$@" "$url" >"$WORK/pgbench.log" 2>&1 \
    || grep -q "error" "$WORK/pgbench.log"; then
    echo "training run failed: pgbench $*" >&2
    cat "$WORK/pgbench.log" >&2
    exit 1
  fi
}
T=$TRAIN_SECONDS
# Transaction pooling, the default: everything.
start_proxy transaction
for tenant in initech acme; do
  url=$(url_of "$tenant")
  for mode in simple extended prepared; do
    for clients in 1 8; do
      train "$url" disable -c "$clients" -j 1 -T "$T" -M "$mode" -f "$WORK/point.sql"
    done
    train "$url" require -c 4 -T "$T" -M "$mode" -f "$WORK/point.sql"
  done
  train "$url" disable -c 4 -T "$T" -M extended -f "$WORK/write.sql"
  train "$url" disable -c 2 -T "$T" -M extended -f "$WORK/rows.sql"
  train "$url" disable -c 4 -T "$T" -C -f "$WORK/point.sql"
  train "$url" require -c 4 -T "$T" -C -f "$WORK/point.sql"
  PGSSLMODE=disable "$PSQL" -q "$url" -c "COPY (SELECT * FROM items) TO STDOUT" >/dev/null
done
stop_proxy
# Session pooling: its own paths (no release per transaction).
start_proxy session
for tenant in initech acme; do
  url=$(url_of "$tenant")
  train "$url" disable -c 4 -T "$T" -M simple -f "$WORK/point.sql"
  train "$url" disable -c 4 -T "$T" -M extended -f "$WORK/write.sql"
done
stop_proxy
ls "$WORK"/proxy-*.profraw >/dev/null 2>&1 || { echo "the trained proxy wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$WORK/pgtenant.profdata" "$WORK"/proxy-*.profraw

# 3. The optimised build. cargo does not look into the profile, so its name carries a hash
# of its content: a new profile changes the flags, which rebuilds every crate with it.
mkdir -p target/pgo/profiles
SUM=$(sha256sum "$WORK/pgtenant.profdata" | cut -c1-16)
PROFILE=$PWD/target/pgo/profiles/pgtenant-$SUM.profdata
find target/pgo/profiles -name '*.profdata' ! -name "pgtenant-$SUM.profdata" -delete
mv "$WORK/pgtenant.profdata" "$PROFILE"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
  CARGO_TARGET_DIR=target/pgo cargo build --release --bin pgtenant
echo "built target/pgo/release/pgtenant"
