#!/usr/bin/env bash
# Runs bascule on 127.0.0.1:8080 (and :8081 with sticky sessions) in front of three
# replicas of examples/app on 127.0.0.1:9001-9003. The replicas keep their state in
# Redis: REDIS_URL if set, else a redis-server started here on 127.0.0.1:6399 when
# one is installed, else each replica's own memory (and the demo says what that
# changes). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")"

echo "Building bascule and the example app (a first build takes about a minute and a half on two cores)..."
cargo build --bin bascule --example app
pids=()
# Every process below runs in a session of its own (setsid), so Ctrl-C reaches this
# script alone, and each gets one SIGTERM from here: bascule drains and stops cleanly.
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo; echo "Stopping..."; exit 0' INT TERM

if [[ -z "${REDIS_URL:-}" ]] && command -v redis-server >/dev/null; then
  setsid redis-server --port 6399 --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  pids+=($!)
  export REDIS_URL=redis://127.0.0.1:6399
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/6399) 2>/dev/null && break
    sleep 0.1
  done
fi

replicas=()
for i in 1 2 3; do
  setsid target/debug/examples/app --listen "127.0.0.1:900$i" --name "replica-$i" >/dev/null &
  replicas+=($!)
done
pids+=("${replicas[@]}")

# The edge cache's Redis tier is the replicas' Redis; without one, each bascule caches alone.
config=conf/demo.yaml
if [[ -z "${REDIS_URL:-}" ]]; then
  config=$(mktemp --suffix .yaml)
  sed '/redis: { url:/d' conf/demo.yaml >"$config"
elif [[ "$REDIS_URL" != redis://127.0.0.1:6399 ]]; then
  config=$(mktemp --suffix .yaml)
  sed "s|redis://127.0.0.1:6399/0|$REDIS_URL|" conf/demo.yaml >"$config"
fi
setsid target/debug/bascule --config "$config" &
bascule=$!
pids+=($bascule)
# A second bascule on :8090 (admin :9902), as a second edge instance would run.
second=$(mktemp --suffix .yaml)
sed -e 's/:8080/:8090/; s/:8081/:8091/; s/:9901/:9902/' "$config" >"$second"
setsid target/debug/bascule --config "$second" 2>/dev/null &
pids+=($!)

# Wait until the balancers answer.
for port in 8080 8090; do
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
    sleep 0.1
  done
done
sleep 1 # the first health checks

jar=$(mktemp)
echo
echo "bascule is on http://127.0.0.1:8080 in front of three replicas. One user, six visits:"
for _ in 1 2 3 4 5 6; do curl -s -b "$jar" -c "$jar" http://127.0.0.1:8080/; done
rm -f "$jar"
echo
if [[ -n "${REDIS_URL:-}" ]]; then
  cat <<MSG
The visits rotate over the replicas and the count goes on: the session lives in Redis
($REDIS_URL), so any replica can serve it. No sticky sessions needed.
MSG
else
  cat <<'MSG'
No Redis here (install redis-server or set REDIS_URL): each replica keeps sessions in
its own memory, so the count starts over on each replica. Port 8081 adds sticky
sessions, which keep a user on one replica:
  c=$(mktemp); for i in 1 2 3; do curl -s -b $c -c $c localhost:8081/; done
MSG
fi
echo
echo "The edge cache: /report takes the app about 300 ms to make, and it says it may be cached"
echo "for a minute, tagged report-1000000. bascule A is :8080, bascule B :8090."
report() {
  local out
  out=$(curl -s -o /dev/null -D - -w 'took %{time_total}s' "http://127.0.0.1:$1/report")
  printf '  %-40s %-32s %s\n' "$2" "$(grep -i '^cache-status' <<<"$out" | tr -d '\r' | cut -d' ' -f2-)" \
    "$(grep -o 'took .*' <<<"$out")"
}
report 8080 "A, the first request:"
report 8080 "A, again:"
sleep 0.2 # A writes its fill to Redis just after answering
if [[ -n "${REDIS_URL:-}" ]]; then
  report 8090 "B, which shares A's Redis:"
  echo "  The app's write path changes the report's data and publishes the purge itself:"
  echo "    $(curl -s -X POST 'http://127.0.0.1:8080/report/refresh')"
  sleep 0.1
  report 8090 "B, after the purge:"
  sleep 0.2
  report 8080 "A, after the purge (B refilled Redis):"
else
  report 8090 "B (no Redis: a cache of its own):"
fi
echo "  (Cache-Status, RFC 9211; POST /caches/edge/purge on :9901 purges by URL, tag or all.)"
echo
echo "Try:"
if [[ -n "${REDIS_URL:-}" ]]; then
  cat <<MSG
  c=\$(mktemp); for i in 1 2 3 4; do curl -s -b \$c -c \$c localhost:8080/; done   # one session, many replicas
  curl -s -X POST -b \$c -c \$c 'localhost:8080/cart?item=tea'; curl -s -b \$c localhost:8080/cart
  time curl -s 'localhost:8080/report?n=2000000'   # slow the first time (cache miss) ...
  time curl -s 'localhost:8080/report?n=2000000'   # ... then a cache hit, on every replica
  curl -s localhost:9002/stats                     # one replica's cache hits and misses
  kill ${replicas[2]}                                  # kill replica-3: traffic moves on, no session lost
MSG
else
  cat <<MSG
  c=\$(mktemp); for i in 1 2 3; do curl -s -b \$c -c \$c localhost:8081/; done   # sticky: one replica
  time curl -s 'localhost:8080/report?n=2000000'   # slow: each replica computes it (no shared cache)
  kill ${replicas[2]}                                  # kill replica-3: traffic moves to the other two
MSG
fi
cat <<MSG
  curl -s localhost:9901/status                    # upstreams and backends as JSON
  curl -s localhost:9901/metrics                   # Prometheus metrics
  curl -s -X POST localhost:9901/caches/edge/purge -d '{"tags": ["report"]}'   # purge, A and B
  kill -HUP $bascule                                # re-read $config after editing it
Ctrl-C stops the demo.
MSG
wait
