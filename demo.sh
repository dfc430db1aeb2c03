#!/usr/bin/env bash
# Runs bascule on 127.0.0.1:8080 in front of three local replicas (127.0.0.1:9001-9003).
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --quiet --bin bascule --example replica
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for i in 1 2 3; do
  target/debug/examples/replica "127.0.0.1:900$i" "replica-$i" &
  pids+=($!)
done
target/debug/bascule --config conf/demo.yaml &
pids+=($!)

# Wait until the balancer answers.
for _ in $(seq 100); do
  curl -s -o /dev/null http://127.0.0.1:8080/ && break
  sleep 0.1
done

echo
echo "bascule is on http://127.0.0.1:8080 in front of three replicas (replica-3 has weight 2):"
for _ in 1 2 3 4 5 6 7 8; do curl -s http://127.0.0.1:8080/hello; done
cat <<'MSG'

Try:
  curl -s localhost:8080/                 # answers rotate over the replicas, replica-3 twice as often
  curl -s localhost:8080/headers          # what a replica receives: X-Forwarded-For, -Proto, -Host
  curl -s --http2-prior-knowledge localhost:8080/   # HTTP/2 without TLS (h2c)
  curl -s localhost:9901/status           # upstreams and backends as JSON
  curl -s localhost:9901/metrics          # Prometheus metrics
MSG
echo "  kill -HUP ${pids[3]}                      # re-read conf/demo.yaml after editing it"
echo "Ctrl-C stops the demo."
wait
