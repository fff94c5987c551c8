# Sourced by the measurement scripts (instructions.sh, pgo.sh) that run pgtenant against the
# demo's throwaway clusters and tenants.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_demo BINARY LOG: starts `BINARY demo --port 0` in the background (with the caller's
# environment), waits until it is up, and sets DEMO (its pid) and CONFIG (the configuration
# it wrote). SIGINT stops it and removes its clusters.
start_demo() {
  "$1" demo --port 0 >"$2" 2>&1 &
  DEMO=$!
  for _ in $(seq 120); do grep -q "Press Ctrl-C" "$2" && break; sleep 1; done
  CONFIG=$(grep -o 'configuration: [^)]*' "$2" | cut -d' ' -f2)
  [ -f "$CONFIG" ] || { echo "the demo did not start:" >&2; cat "$2" >&2; exit 1; }
}
