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
# The package's own cluster is not needed: the tests start their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet postgresql 2>/dev/null; then
  systemctl stop postgresql || true
fi

cargo test --locked "$@"
