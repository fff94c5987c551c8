#!/usr/bin/env bash
# Runs every test. On a machine without the PostgreSQL server binaries it installs them first
# (Debian: apt-get install postgresql; as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

have_server() {
  local dir
  dir=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_server || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then
  echo "installing PostgreSQL server and client binaries..." >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq postgresql postgresql-contrib >/dev/null
fi
# Real drivers for tests/drivers.rs: psycopg 3 and asyncpg (pip), node-postgres (npm),
# pgjdbc (Debian's libpostgresql-jdbc-java) and a Java runtime to run it.
apt_install() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null \
    || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; }
}
if ! python3 -c 'import psycopg, asyncpg' 2>/dev/null; then
  echo "installing psycopg 3 and asyncpg..." >&2
  command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 || apt_install python3 python3-pip
  python3 -m pip install -q 'psycopg[binary]>=3.1,<4' 'asyncpg>=0.29,<1' 2>/dev/null \
    || python3 -m pip install -q --break-system-packages 'psycopg[binary]>=3.1,<4' 'asyncpg>=0.29,<1'
fi
if ! command -v npm >/dev/null; then
  echo "installing Node.js..." >&2
  apt_install nodejs npm
fi
if [ ! -d tests/drivers/node/node_modules/pg ]; then
  echo "installing node-postgres..." >&2
  npm ci --silent --no-audit --no-fund --prefix tests/drivers/node
fi
if [ ! -f /usr/share/java/postgresql.jar ] || ! command -v javac >/dev/null; then
  echo "installing pgjdbc and a JDK (the check runs as a Java source file)..." >&2
  apt_install libpostgresql-jdbc-java default-jdk-headless
fi

# The package's own cluster is not needed: the tests start their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
  systemctl stop postgresql || true
fi

cargo test --locked "$@"
