#!/usr/bin/env bash
# Drive compose.yaml's stack as a user would, with a real Docker engine, and ASSERT:
#   1. cold start: `up -d`, every service healthy (what `up --wait` waits for); the demo
#      publisher's clicks land as rows; after the publisher stops, rows == clicks published;
#   2. `stop consumer` mid-stream: exit code 0 within Docker's 10 s; nothing lost, nothing
#      unacknowledged (published == rows + ready messages; 0 unacked); after a restart the
#      rest is stored exactly once;
#   3. `up -d --scale consumer=3` (with the `monitoring` profile): every replica consumes
#      (each replica's own /metrics), each event stored once (count == distinct == published);
#      Prometheus scrapes all three replicas and has loaded monitoring/alerts.yml;
#   4. the ClickHouse container stopped for 20 s mid-stream: /ready goes 503 and back to 200,
#      the consumer container is not restarted, nothing is lost;
#   5. the RabbitMQ container restarted: the consumer reconnects (same container, reconnect
#      counter up, ready again) and stores what is published afterwards.
# Figures (cold start, shutdown time, replica shares, image size) go to stdout and to
# target/compose-test/results.txt. Containers, networks and volumes are removed at the end,
# on failure too (trap).
#
#   scripts/compose-test.sh [--local | --official]
#
# --local (the default when rabbitmq:4.2-management is neither present nor pullable, as on
# this project's machines, which have no registry): adds compose.local.yaml, which swaps the
# server images for local stand-ins built from Debian bookworm packages (RabbitMQ 3.10.8,
# ClickHouse 18.16.1, Prometheus 2.42). The consumer image is click-consumer:local, built by
# scripts/docker-image.sh (run first when it is missing).
#
# Compose: `docker compose` (v2) when the CLI has it, else `docker-compose` (v1, Debian's
# 1.29.2 on these machines; it has no `up --wait`, so the wait is done here by polling each
# container's health, which is what `--wait` does).
#
# Test events are published through RabbitMQ's management HTTP API (curl), each with a
# unique original_url (https://example.com/ci/<run>/<phase>/<n>), so stored rows can be
# counted per phase and checked for duplicates (count() vs uniqExact()).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-clickconsumer-test}
OUT=target/compose-test
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
: >"$RESULTS"
RUN_ID=$(date +%s)-$$
passed=0

mode=auto
for arg in "$@"; do
    case $arg in
        --local) mode=local ;;
        --official) mode=official ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[compose-test %3ss] %s\n' "$SECONDS" "$*"; }
fail() { printf '\n[compose-test] FAIL: %s\n' "$*" >&2; exit 1; }
ok() { passed=$((passed + 1)); log "ok: $*"; }
figure() { printf '%s\n' "$*" | tee -a "$RESULTS"; }

# --- compose tool ---------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE_TOOL=(docker compose)
    compose_v2=true
else
    command -v docker-compose >/dev/null || fail "neither \`docker compose\` nor \`docker-compose\` is installed"
    COMPOSE_TOOL=(docker-compose)
    compose_v2=false
fi
log "compose tool: ${COMPOSE_TOOL[*]} ($("${COMPOSE_TOOL[@]}" version 2>/dev/null | head -1))"
$compose_v2 || log "NOTE: \`docker compose\` (v2) is not installed here: using docker-compose v1, and waiting for health by polling (v1 has no \`up --wait\`)"

if [[ $mode == auto ]]; then
    if docker image inspect rabbitmq:4.2-management >/dev/null 2>&1 \
        || timeout 60 docker pull -q rabbitmq:4.2-management >/dev/null 2>&1; then
        mode=official
    else
        mode=local
    fi
fi
FILES=(-f compose.yaml)
if [[ $mode == local ]]; then
    FILES+=(-f compose.local.yaml)
    log "NOTE: no registry: the servers are LOCAL STAND-INS from Debian bookworm packages (compose.local.yaml): RabbitMQ 3.10.8, ClickHouse 18.16.1, Prometheus 2.42"
fi
compose() { "${COMPOSE_TOOL[@]}" "${FILES[@]}" --profile monitoring "$@"; }

# Free host ports for the published ports, so the test never collides with a server already
# listening on 5672/15672/8123/9091 on this machine.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export RABBITMQ_HOST_PORT RABBITMQ_UI_HOST_PORT CLICKHOUSE_HOST_PORT PROMETHEUS_HOST_PORT
RABBITMQ_HOST_PORT=$(free_port)
RABBITMQ_UI_HOST_PORT=$(free_port)
CLICKHOUSE_HOST_PORT=$(free_port)
PROMETHEUS_HOST_PORT=$(free_port)

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "---- last container logs (failure) ----" >&2
        compose logs --no-color --tail=15 >&2 2>/dev/null || true
    fi
    log "cleanup: down -v --remove-orphans"
    compose down -v --remove-orphans -t 15 >/dev/null 2>&1 || true
    jobs -p | xargs -r kill 2>/dev/null || true
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- images ---------------------------------------------------------------------------------
docker image inspect click-consumer:local >/dev/null 2>&1 || scripts/docker-image.sh
if [[ $mode == local ]]; then
    scripts/docker-standins.sh docker/local/*/Dockerfile
    # The three builds mostly wait on Debian's mirror and on layer commits: run them together.
    start=$SECONDS
    declare -A build_pids
    for server in rabbitmq clickhouse prometheus; do
        docker build -q --network host -t "click-consumer-local/$server:bookworm" "docker/local/$server" \
            >/dev/null 2>"$OUT/build-$server.err" &
        build_pids[$server]=$!
    done
    for server in rabbitmq clickhouse prometheus; do
        wait "${build_pids[$server]}" || { cat "$OUT/build-$server.err" >&2; fail "cannot build the $server image"; }
    done
    log "images click-consumer-local/{rabbitmq,clickhouse,prometheus}:bookworm ready ($((SECONDS - start)) s)"
fi
image_mb=$(docker image inspect -f '{{.Size}}' click-consumer:local | awk '{printf "%.1f", $1 / 1e6}')

# --- helpers --------------------------------------------------------------------------------
ids_of() { docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --filter "label=com.docker.compose.service=$1"; }
one_id() { local ids; ids=$(ids_of "$1"); [[ $(wc -w <<<"$ids") -eq 1 ]] || fail "expected one $1 container, found: $ids"; echo "$ids"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1"; }

# What `up --wait` does: every running container of the project healthy (or running, where
# it has no healthcheck), within $1 seconds.
wait_healthy() {
    local deadline=$((SECONDS + $1)) id all status
    while :; do
        all=true
        for id in $(docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"); do
            status=$(health "$id")
            [[ $status == healthy || $status == running ]] || { all=false; break; }
        done
        $all && return 0
        ((SECONDS < deadline)) || { docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --format '{{.Names}} {{.Status}}' >&2; return 1; }
        sleep 0.5
    done
}

up() {
    if $compose_v2; then compose up -d --wait "$@"; else compose up -d "$@" && wait_healthy 180; fi
}

ch() { compose exec -T clickhouse clickhouse-client --password clickhouse -q "$1"; }
rows() { ch "SELECT count(), uniqExact(original_url) FROM url_shortener.click_events WHERE original_url LIKE 'https://example.com/ci/$RUN_ID/$1/%' FORMAT TSV" | tr '\t' ' '; }
demo_rows() { ch "SELECT count() FROM url_shortener.click_events WHERE original_url LIKE 'https://example.com/landing/%'" | tr -d '\r'; }

# "ready unacked" of the click_events queue.
queue() {
    compose exec -T rabbitmq rabbitmqctl list_queues -q --no-table-headers name messages_ready messages_unacknowledged \
        | awk '$1 == "click_events" {print $2, $3}'
}

wait_drained() { # seconds
    local deadline=$((SECONDS + $1)) q
    while :; do
        q=$(queue)
        [[ $q == "0 0" ]] && return 0
        ((SECONDS < deadline)) || fail "queue not drained after $1 s (ready unacked: $q)"
        sleep 1
    done
}

# Publishes $2 unique events tagged $1 at about $3 per second through the management API, in
# slices of a fifth of a second, each slice one curl process (keep-alive) with one request
# per event; prints how many RabbitMQ routed to the queue.
publish() {
    local tag=$1 n=$2 rate=$3 i=0 routed=0 now slice cfg got
    local url="http://127.0.0.1:$RABBITMQ_UI_HOST_PORT/api/exchanges/%2F/url_shortener/publish"
    slice=$(((rate + 4) / 5))
    cfg=$(mktemp)
    while ((i < n)); do
        now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
        : >"$cfg"
        for ((j = 0; j < slice && i < n; j++)); do
            i=$((i + 1))
            printf 'url = "%s"\nuser = "clicks:clicks-secret"\nheader = "content-type: application/json"\ndata = "{\\"properties\\":{\\"delivery_mode\\":2,\\"content_type\\":\\"application/json\\"},\\"routing_key\\":\\"click_events\\",\\"payload_encoding\\":\\"string\\",\\"payload\\":\\"{\\\\\\"short_code\\\\\\":\\\\\\"ci%s\\\\\\",\\\\\\"timestamp\\\\\\":\\\\\\"%s\\\\\\",\\\\\\"user_agent\\\\\\":\\\\\\"compose-test\\\\\\",\\\\\\"ip_address\\\\\\":\\\\\\"192.0.2.%s\\\\\\",\\\\\\"referrer\\\\\\":\\\\\\"\\\\\\",\\\\\\"original_url\\\\\\":\\\\\\"https://example.com/ci/%s/%s/%s\\\\\\"}\\"}"\nnext\n' \
                "$url" "$((i % 10))" "$now" "$((i % 250 + 1))" "$RUN_ID" "$tag" "$i" >>"$cfg"
        done
        got=$(curl -sS -m 10 -K "$cfg" 2>/dev/null | grep -o '"routed":true' | wc -l || true)
        routed=$((routed + got))
        sleep 0.2
    done
    rm -f "$cfg"
    echo "$routed"
}

metrics_port() { docker port "$1" 9090/tcp | head -1 | sed 's/.*://'; }
metric() { # container metric-name
    curl -fsS -m 5 "http://127.0.0.1:$(metrics_port "$1")/metrics" | awk -v m="$2" '$1 == m {print $2; found=1} END {if (!found) print 0}'
}
ready_code() { curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:$(metrics_port "$1")/ready" || true; }
restarts() { docker inspect -f '{{.RestartCount}} {{.State.StartedAt}}' "$1"; }

# --- 1. cold start --------------------------------------------------------------------------
log "1. cold start"
compose down -v --remove-orphans >/dev/null 2>&1 || true
start=$SECONDS
t0=$(date +%s.%N)
if $compose_v2; then
    "${COMPOSE_TOOL[@]}" "${FILES[@]}" up -d --wait
else
    "${COMPOSE_TOOL[@]}" "${FILES[@]}" up -d
    wait_healthy 180 || fail "services not healthy within 180 s"
fi
t_healthy=$(date +%s.%N)
for service in rabbitmq clickhouse consumer; do
    [[ $(health "$(one_id $service)") == healthy ]] || fail "$service not healthy"
done
[[ $(docker inspect -f '{{.State.Status}}' "$(one_id publisher)") == running ]] || fail "publisher not running"
ok "rabbitmq, clickhouse, consumer healthy; publisher running"
deadline=$((SECONDS + 60))
until [[ $(demo_rows) -gt 0 ]]; do
    ((SECONDS < deadline)) || fail "no demo click stored within 60 s of the stack being healthy"
    sleep 0.5
done
t_row=$(date +%s.%N)
cold_healthy=$(awk -v a="$t0" -v b="$t_healthy" 'BEGIN {printf "%.1f", b - a}')
cold_row=$(awk -v a="$t0" -v b="$t_row" 'BEGIN {printf "%.1f", b - a}')
ok "demo clicks land as rows"

sleep 5
compose stop publisher >/dev/null 2>&1
demo_published=$(compose logs --no-color publisher | sed -n 's/.*published \([0-9][0-9]*\) demo clicks.*/\1/p' | tail -1)
[[ -n $demo_published ]] || fail "the publisher did not log how many clicks it published"
wait_drained 60
demo_stored=$(demo_rows)
[[ $demo_stored -eq $demo_published ]] || fail "demo: published $demo_published, stored $demo_stored"
ok "demo publisher: $demo_published published, $demo_stored stored"

# --- 2. stop consumer mid-stream ------------------------------------------------------------
log "2. stop consumer mid-stream"
consumer=$(one_id consumer)
publish stop 600 100 >"$OUT/stop.published" &
publisher_pid=$!
sleep 3
before_stop=$(metric "$consumer" click_consumer_messages_received_total)
[[ ${before_stop%.*} -gt 0 ]] || fail "the consumer had received nothing before the stop"
t_stop0=$(date +%s.%N)
compose stop consumer >/dev/null 2>&1
t_stop1=$(date +%s.%N)
stop_s=$(awk -v a="$t_stop0" -v b="$t_stop1" 'BEGIN {printf "%.1f", b - a}')
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$consumer")
[[ $exit_code -eq 0 ]] || fail "consumer exit code $exit_code after stop"
awk -v s="$stop_s" 'BEGIN {exit !(s < 10)}' || fail "stop took $stop_s s (Docker's default timeout is 10 s)"
ok "consumer stopped mid-stream in $stop_s s, exit code 0"
wait "$publisher_pid"
published=$(cat "$OUT/stop.published")
read -r stored distinct <<<"$(rows stop)"
read -r ready unacked <<<"$(queue)"
[[ $unacked -eq 0 ]] || fail "$unacked messages unacknowledged with no consumer"
[[ $((distinct + ready)) -eq $published && $stored -eq $distinct ]] \
    || fail "stop: published $published, stored $stored ($distinct distinct), $ready still queued"
ok "after the stop: published $published = $stored stored + $ready queued, 0 unacked"

# --- 3. three replicas, with Prometheus ------------------------------------------------------
log "3. --scale consumer=3, --profile monitoring"
up --scale consumer=3 consumer prometheus || fail "3 replicas not healthy"
mapfile -t replicas < <(ids_of consumer)
[[ ${#replicas[@]} -eq 3 ]] || fail "expected 3 consumer replicas, found ${#replicas[@]}"
wait_drained 60 # the leftover of phase 2
read -r stored distinct <<<"$(rows stop)"
[[ $stored -eq $published && $distinct -eq $published ]] || fail "stop: published $published, finally stored $stored ($distinct distinct)"
ok "after the restart the rest was stored: $published published, $stored stored, $distinct distinct"
declare -A base
for r in "${replicas[@]}"; do base[$r]=$(metric "$r" click_consumer_messages_received_total); done
published=$(publish scale 900 150)
wait_drained 60
read -r stored distinct <<<"$(rows scale)"
[[ $stored -eq $published && $distinct -eq $published ]] || fail "scale: published $published, stored $stored ($distinct distinct)"
ok "3 replicas: $published published, $stored stored, $distinct distinct"
shares=()
for r in "${replicas[@]}"; do
    got=$(($(metric "$r" click_consumer_messages_received_total | cut -d. -f1) - ${base[$r]%.*}))
    [[ $got -gt 0 ]] || fail "replica $(docker inspect -f '{{.Name}}' "$r") consumed nothing"
    shares+=("$got")
done
scale_published=$published
ok "every replica consumed: ${shares[*]} of $published"

# Prometheus: all three targets up, the rules loaded.
prom="http://127.0.0.1:$PROMETHEUS_HOST_PORT"
deadline=$((SECONDS + 60))
until [[ $(curl -fsS -m 5 "$prom/api/v1/query?query=count(up%7Bjob%3D%22click-consumer%22%7D%3D%3D1)" 2>/dev/null | sed -n 's/.*"value":\[[^,]*,"\([0-9]*\)"\].*/\1/p') == 3 ]]; do
    ((SECONDS < deadline)) || fail "Prometheus does not see 3 consumer targets up"
    sleep 2
done
ok "Prometheus scrapes all 3 replicas (Docker DNS discovery)"
loaded=$(curl -fsS -m 5 "$prom/api/v1/rules" | grep -o '"type":"alerting"' | wc -l)
expected=$(grep -c '^ *- alert:' monitoring/alerts.yml)
[[ $loaded -eq $expected ]] || fail "Prometheus loaded $loaded alerting rules, monitoring/alerts.yml has $expected"
ok "Prometheus loaded the $loaded alert rules"
# Every metric the rules use must be in a real scrape.
scrape=$(curl -fsS -m 5 "http://127.0.0.1:$(metrics_port "${replicas[0]}")/metrics")
for name in $(grep -o 'click_consumer_[a-z_]*' monitoring/alerts.yml | sort -u); do
    grep -q "^$name" <<<"$scrape" || fail "monitoring/alerts.yml uses $name, which /metrics does not serve"
done
ok "every metric the alert rules use is served"

# --- 4. ClickHouse down for 20 s mid-stream ----------------------------------------------------
log "4. ClickHouse stopped for 20 s mid-stream"
up --scale consumer=1 consumer || fail "not healthy at 1 replica"
consumer=$(one_id consumer)
before=$(restarts "$consumer")
publish outage 800 20 >"$OUT/outage.published" &
publisher_pid=$!
sleep 5
compose stop clickhouse >/dev/null 2>&1
t_down=$SECONDS
saw_503=false
while ((SECONDS - t_down < 20)); do
    [[ $(ready_code "$consumer") == 503 ]] && saw_503=true
    sleep 0.5
done
$saw_503 || fail "/ready never answered 503 while ClickHouse was down"
ok "/ready answered 503 while ClickHouse was down"
compose start clickhouse >/dev/null 2>&1
t_up=$SECONDS
until [[ $(ready_code "$consumer") == 200 ]]; do
    ((SECONDS - t_up < 90)) || fail "/ready not 200 within 90 s of ClickHouse starting again"
    sleep 0.5
done
recover_s=$((SECONDS - t_up))
ok "/ready back to 200 ${recover_s} s after ClickHouse started again"
wait "$publisher_pid"
published=$(cat "$OUT/outage.published")
wait_drained 120
read -r stored distinct <<<"$(rows outage)"
[[ $distinct -eq $published ]] || fail "outage: published $published, stored $distinct distinct ($stored rows)"
after=$(restarts "$consumer")
[[ $after == "$before" && $(one_id consumer) == "$consumer" ]] || fail "the consumer was restarted ($before -> $after)"
ok "nothing lost across the outage ($published published, $distinct distinct stored, $((stored - distinct)) duplicates), consumer not restarted"

# --- 5. RabbitMQ restarted ---------------------------------------------------------------------
log "5. RabbitMQ restarted"
reconnects=$(metric "$consumer" click_consumer_broker_reconnects_total)
compose restart rabbitmq >/dev/null 2>&1
wait_healthy 120 || fail "not healthy after the RabbitMQ restart"
t_up=$SECONDS
until [[ $(ready_code "$consumer") == 200 && $(metric "$consumer" click_consumer_broker_reconnects_total) != "$reconnects" ]]; do
    ((SECONDS - t_up < 90)) || fail "the consumer did not reconnect within 90 s of RabbitMQ being healthy"
    sleep 0.5
done
ok "the consumer reconnected (broker_reconnects_total $reconnects -> $(metric "$consumer" click_consumer_broker_reconnects_total))"
published=$(publish afterrestart 100 100)
wait_drained 60
read -r stored distinct <<<"$(rows afterrestart)"
[[ $stored -eq $published && $distinct -eq $published ]] || fail "after the restart: published $published, stored $stored"
after=$(restarts "$consumer")
[[ $after == "$before" && $(one_id consumer) == "$consumer" ]] || fail "the consumer was restarted ($before -> $after)"
ok "after the reconnect: $published published and stored; consumer not restarted"

# --- figures ----------------------------------------------------------------------------------
echo
figure "servers: $([[ $mode == local ]] && echo 'LOCAL STAND-INS (compose.local.yaml: RabbitMQ 3.10.8, ClickHouse 18.16.1, Prometheus 2.42)' || echo 'official images')"
figure "compose: ${COMPOSE_TOOL[*]}"
figure "image click-consumer:local: $image_mb MB"
figure "cold start (up -d, fresh volumes) to all healthy: $cold_healthy s; to the first demo row stored: $cold_row s"
figure "stop consumer mid-stream: $stop_s s, exit code 0"
figure "replica shares (3 replicas, messages received of $scale_published published): ${shares[*]}"
figure "ClickHouse outage: /ready back to 200 $recover_s s after ClickHouse started"
echo
echo "compose test: $passed passed, 0 failed"
