#!/usr/bin/env bash
# Checks a real /metrics scrape with Debian's `promtool check metrics` (Prometheus 2.42,
# which reads the classic text format): the debug binary runs against a private
# RabbitMQ and ClickHouse (testkit's local-stack) with demo clicks flowing, and once it
# has stored rows, /metrics is scraped as promtool, Prometheus and `curl` would ask for
# it. Fails on any promtool finding, a wrong content type, or a HEAD that is not 200.
#
# Installs the `prometheus` package (for promtool) when promtool is missing, with the
# package's service kept from starting. CI runs this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${CHECK_METRICS_INNER:-}" = 1 ]; then
  # Run by local-stack, with RABBITMQ_URL and CLICKHOUSE_* set to its servers; it runs
  # its demo publisher through this script too.
  if [ "${1:-}" = publish-demo ]; then
    exec target/debug/click-consumer "$@"
  fi
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  out=target/check-metrics
  mkdir -p "$out"
  METRICS_ADDR="127.0.0.1:$port" BATCH_TIMEOUT_MS=200 LOG_LEVEL=${LOG_LEVEL:-warn} \
    target/debug/click-consumer &
  consumer=$!
  trap 'kill -TERM "$consumer" 2>/dev/null || true; wait "$consumer" || true' EXIT
  url="http://127.0.0.1:$port/metrics"
  for _ in $(seq 1 300); do
    rows=$(curl -fsS "$url" 2>/dev/null | awk '/^click_consumer_rows_inserted_total /{print $2}' || true)
    [ -n "$rows" ] && [ "$rows" != 0 ] && break
    sleep 0.1
  done
  if [ -z "$rows" ] || [ "$rows" = 0 ]; then
    echo "check-metrics.sh: no rows stored within 30 s" >&2
    exit 1
  fi
  echo "check-metrics.sh: scraping $url after $rows rows"
  failed=0
  prometheus_accept='application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1'
  check_type() { # name, expected content type, curl arguments...
    local name=$1 expected=$2
    shift 2
    local got
    got=$(curl -fsS -o "$out/$name.txt" -w '%{content_type}' "$@" "$url")
    if [ "$got" != "$expected" ]; then
      echo "check-metrics.sh: $name: content type \`$got\`, expected \`$expected\`" >&2
      failed=1
    fi
  }
  classic='text/plain; version=0.0.4; charset=utf-8'
  check_type no-accept "$classic"
  check_type text-plain "$classic" -H 'Accept: text/plain'
  check_type prometheus 'application/openmetrics-text; version=1.0.0; charset=utf-8' \
    -H "Accept: $prometheus_accept"
  head_status=$(curl -sS -o /dev/null -w '%{http_code}' -I "$url")
  if [ "$head_status" != 200 ]; then
    echo "check-metrics.sh: HEAD /metrics answered $head_status" >&2
    failed=1
  fi
  for scrape in no-accept text-plain; do
    echo "--- promtool check metrics < $out/$scrape.txt ($(grep -c -v '^#' "$out/$scrape.txt") samples)"
    if ! promtool check metrics <"$out/$scrape.txt" >"$out/$scrape.promtool" 2>&1 ||
      [ -s "$out/$scrape.promtool" ]; then
      cat "$out/$scrape.promtool" >&2
      failed=1
    fi
  done
  if ! grep -q '^# EOF$' "$out/prometheus.txt"; then
    echo "check-metrics.sh: the OpenMetrics answer lacks # EOF" >&2
    failed=1
  fi
  [ "$failed" = 0 ] && echo "check-metrics.sh: promtool clean, formats negotiated, HEAD answered"
  exit "$failed"
fi

started=$SECONDS
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then AS_ROOT=(); else AS_ROOT=(sudo); fi
  POLICY_RC=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY_RC" ]; then
    "${AS_ROOT[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' >'$POLICY_RC' && chmod 755 '$POLICY_RC'"
    trap '"${AS_ROOT[@]}" rm -f "$POLICY_RC"' EXIT
  fi
  was_running=no
  pgrep -u prometheus >/dev/null 2>&1 && was_running=yes
  echo "check-metrics.sh: installing prometheus (for promtool)" >&2
  "${AS_ROOT[@]}" apt-get -q update
  "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -q install -y --no-install-recommends prometheus curl
  if [ "$was_running" = no ] && pgrep -u prometheus >/dev/null 2>&1; then
    "${AS_ROOT[@]}" /etc/init.d/prometheus stop || echo "warning: could not stop prometheus" >&2
  fi
fi
promtool --version 2>&1 | head -1
scripts/install-services.sh
cargo build --locked -p click-consumer-cli -p click-consumer-testkit --bin click-consumer --bin local-stack
CHECK_METRICS_INNER=1 target/debug/local-stack --demo-rate 200 -- scripts/check-metrics.sh
echo "check-metrics.sh: done in $((SECONDS - started)) s"
