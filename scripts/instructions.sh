#!/usr/bin/env bash
# Instructions per transaction, counted by valgrind's callgrind: the proxy's own user-space
# work, the same from run to run (timings on a shared 2-core machine vary by 10-20%, which
# hides most single changes). pgbench, one client, a `-S`-like query with a new key each time,
# in the simple, extended and prepared protocols, through pgtenant (transaction pooling, guard
# on) for the demo's dedicated tenant (initech) and a shared one on the verified context
# (acme), through bare forwarders of one connection that show the floor under any relay
# (examples/relay_floor.rs: a minimal tokio one, the same without a time driver, the same
# shape on the smallest executor and reactor of its own, that one made thread-safe as a real
# runtime must be, and a bare epoll loop), and
# through PgBouncer (transaction mode, same server) when it is installed.
#
#   scripts/instructions.sh [transactions]     (default 2000 per run)
#   PGTENANT=/tmp/old/pgtenant scripts/instructions.sh    (count another build of pgtenant,
#   e.g. target/pgo/release/pgtenant, the one scripts/pgo.sh builds with profile-guided
#   optimisation)
#
# Needs valgrind and PostgreSQL's pgbench (installs valgrind with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
WARM=200
if ! command -v valgrind >/dev/null && command -v apt-get >/dev/null; then
  apt-get install -y valgrind >/dev/null
fi
BIN=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
PGBENCH=$BIN/pgbench
[ -x "$PGBENCH" ] || PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
# Two builds: an example brings the dev-dependencies' features (tokio's `process`, whose
# driver adds work to every park), which must not reach the binary measured.
cargo build --release --bin pgtenant
cargo build --release --example relay_floor
# PGTENANT=/path/to/pgtenant counts another build (an older commit's, to compare).
PGTENANT=${PGTENANT:-$PWD/target/release/pgtenant}
FLOOR=$PWD/target/release/examples/relay_floor

WORK=$(mktemp -d /tmp/pgtenant-instructions.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The demo removes its clusters on SIGINT.
  [ -n "${DEMO:-}" ] && kill -INT "$DEMO" 2>/dev/null && sleep 3
  rm -rf "$WORK"
}
trap cleanup EXIT

. scripts/demo-env.sh

# The demo starts the clusters, the tenants and a configuration; its own proxy is not measured.
start_demo "$PGTENANT" "$WORK/demo.log"
url_of() { grep -o "postgresql://app\.$1[^\"]*" "$WORK/demo.log"; }

cat >"$WORK/tx.sql" <<'EOF'
\set id random(1, 100000)
SELECT name FROM items WHERE id = :id;
EOF
chmod 644 "$WORK/tx.sql"

# Runs callgrind on pid $1 (as user $2) over $N transactions of mode $3 against URL $4.
count() {
  local pid=$1 user=$2 mode=$3 url=$4 ctl=(callgrind_control)
  [ "$user" != root ] && ctl=(runuser -u "$user" -- callgrind_control)
  "$PGBENCH" -n -c 1 -t "$WARM" -M "$mode" -f "$WORK/tx.sql" "$url" >/dev/null 2>&1 || true
  "${ctl[@]}" -z "$pid" >/dev/null 2>&1
  if ! "$PGBENCH" -n -c 1 -t "$N" -M "$mode" -f "$WORK/tx.sql" "$url" >"$WORK/pgbench.log" 2>&1 \
    || grep -q "error" "$WORK/pgbench.log"; then
    echo "failed"
    return
  fi
  rm -f "$WORK/cg.$pid".*
  "${ctl[@]}" -d "$pid" >/dev/null 2>&1
  sleep 1
  local ir
  ir=$(grep -h '^summary:' "$WORK/cg.$pid".* | awk '{s+=$2} END {print s}')
  echo $((ir / N))
}

PORT=$(free_port)
# The configuration in a directory of its own: pgtenant watches the file's directory, and a
# write there (pgbench's log, callgrind's files) would wake it in the middle of a count.
mkdir "$WORK/conf"
sed "0,/^addr = .*/s//addr = \"127.0.0.1:$PORT\"/" "$CONFIG" >"$WORK/conf/pgtenant.toml"
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$PGTENANT" \
  --config "$WORK/conf/pgtenant.toml" >"$WORK/pgtenant.log" 2>&1 &
PGT=$!
PIDS+=("$PGT")
for _ in $(seq 120); do grep -q "pgtenant listening" "$WORK/pgtenant.log" && break; sleep 1; done

printf '%-28s %10s %10s %10s\n' "instructions per transaction" simple extended prepared
for tenant in initech acme; do
  url=$(url_of "$tenant" | sed -E "s/@127.0.0.1:[0-9]+/@127.0.0.1:$PORT/")
  row=()
  for mode in simple extended prepared; do row+=("$(count "$PGT" root "$mode" "$url")"); done
  printf '%-28s %10s %10s %10s\n' "pgtenant $tenant" "${row[@]}"
done

# The dedicated tenant's database, as the proxy's login reaches it.
SHARD=$(awk '/^\[shards\.initech-db\]/{p=1} p&&/^port/{print $3; exit}' "$CONFIG")
PASS=$(awk '/^\[shards\.initech-db\]/{p=1} p&&/^password/{gsub(/"/,"",$3); print $3; exit}' "$CONFIG")

# The floor: bare forwarders of one connection (examples/relay_floor.rs), no pooling, no
# parsing, the server's own login.
for relay in tokio tokio-io tasks tasks-sync epoll; do
  FPORT=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$FLOOR" "$relay" \
    "127.0.0.1:$FPORT" "127.0.0.1:$SHARD" >"$WORK/floor-$relay.log" 2>&1 &
  FPID=$!
  PIDS+=("$FPID")
  for _ in $(seq 60); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $FPORT)).close()" 2>/dev/null && break
    sleep 1
  done
  url="postgresql://pgtenant_app:$PASS@127.0.0.1:$FPORT/initech"
  row=()
  for mode in simple extended prepared; do row+=("$(count "$FPID" root "$mode" "$url")"); done
  printf '%-28s %10s %10s %10s\n' "bare $relay relay" "${row[@]}"
done

if [ -x /usr/sbin/pgbouncer ]; then
  BPORT=$(free_port)
  cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
initech = host=127.0.0.1 port=$SHARD dbname=initech user=pgtenant_app password=$PASS
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = plain
auth_file = $WORK/users.txt
pool_mode = transaction
default_pool_size = 20
logfile = $WORK/pgbouncer.log
EOF
  echo '"bench" "benchpw"' >"$WORK/users.txt"
  find "$WORK" -maxdepth 1 -type f -exec chmod 644 {} +
  USER_=root
  RUN=()
  # PgBouncer does not run as root.
  if [ "$(id -u)" = 0 ]; then USER_=postgres; RUN=(runuser -u postgres --); chown postgres "$WORK"; fi
  "${RUN[@]}" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" /usr/sbin/pgbouncer \
    "$WORK/pgbouncer.ini" >"$WORK/vg.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 60); do grep -q "process up" "$WORK/pgbouncer.log" 2>/dev/null && break; sleep 1; done
  BPID=$(grep -m1 -o '\[[0-9]*\] LOG' "$WORK/pgbouncer.log" | tr -dc 0-9)
  PIDS+=("$BPID")
  url="postgresql://bench:benchpw@127.0.0.1:$BPORT/initech"
  row=()
  for mode in simple extended prepared; do row+=("$(count "$BPID" "$USER_" "$mode" "$url")"); done
  printf '%-28s %10s %10s %10s\n' "pgbouncer initech" "${row[@]}"
fi
